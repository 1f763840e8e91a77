"""One multivariate Gaussian per feature-map position (PaDiM, RegAD): fitted in chunks of
positions, scored by the Mahalanobis distance."""

from __future__ import annotations

import torch


@torch.no_grad()
def fit_position_gaussians(
    embeddings: torch.Tensor, covariance_eps: float = 0.01, chunk_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """N x d x h x w embeddings -> (mean d x (h*w), inverse covariances (h*w) x d x d).

    Each position's covariance is the unbiased sample covariance of its N vectors plus
    `covariance_eps` * I (estimated in float64, inverted, stored in float32). Positions go in chunks
    of `chunk_size`: the covariance is a batched matrix product over them.
    """
    num, dim = embeddings.shape[:2]
    if num < 2:
        raise ValueError("a covariance needs at least 2 embeddings per position")
    flat = embeddings.reshape(num, dim, -1)
    mean = flat.mean(dim=0)
    inverses = []
    identity = torch.eye(dim, device=flat.device, dtype=torch.float64)
    for start in range(0, flat.shape[2], chunk_size):
        centred = flat[:, :, start : start + chunk_size] - mean[:, start : start + chunk_size]
        centred = centred.permute(2, 0, 1).double().contiguous()  # P x N x d; bmm on permuted strides is ~8x slower
        covariance = centred.transpose(1, 2) @ centred / (num - 1) + covariance_eps * identity
        inverses.append(torch.linalg.inv(covariance).float())
    return mean.contiguous(), torch.cat(inverses).contiguous()


def position_mahalanobis(embedding: torch.Tensor, mean: torch.Tensor, inv_covariance: torch.Tensor) -> torch.Tensor:
    """B x d x h x w embeddings -> B x h x w Mahalanobis distances to each position's Gaussian."""
    batch, dim, h, w = embedding.shape
    delta = (embedding.reshape(batch, dim, -1) - mean).permute(2, 0, 1).contiguous()  # P x B x d (bmm: contiguous)
    squared = ((delta @ inv_covariance) * delta).sum(dim=2)  # P x B
    return squared.clamp_min(0).sqrt().T.reshape(batch, h, w)
