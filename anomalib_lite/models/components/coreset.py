"""Greedy k-center coreset selection (Sener & Savarese 2018; PatchCore, Roth et al. 2022)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def random_projection(features: torch.Tensor, projection_dim: int, seed: int = 0) -> torch.Tensor:
    """Johnson-Lindenstrauss projection with a seeded Gaussian matrix (identity if already small)."""
    if projection_dim <= 0 or features.shape[1] <= projection_dim:
        return features.float()
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], projection_dim, generator=generator) / projection_dim**0.5
    return features.float() @ matrix.to(features.device)


@torch.no_grad()
def greedy_coreset(
    features: torch.Tensor,
    k: int,
    projection_dim: int = 128,
    seed: int = 0,
    *,
    progress: bool = False,
) -> torch.Tensor:
    """Indices of `k` rows of `features` (N x D) picked by exact greedy k-center.

    Each step adds the point farthest from everything picked so far, in a seeded random
    projection of the features. The loop runs on the features' device with buffers allocated
    once: per step one matrix-vector product (distances to the new centre) and three passes over
    an N-vector, with no host synchronisation (GPU-friendly).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be N x D, got shape {tuple(features.shape)}")
    num_points = features.shape[0]
    if not 0 < k <= num_points:
        raise ValueError(f"k must be in [1, {num_points}], got {k}")
    points = random_projection(features, projection_dim, seed).contiguous()
    squared_norms = (points * points).sum(dim=1)
    min_distances = torch.full((num_points,), float("inf"), device=points.device)
    distances = torch.empty_like(min_distances)
    selected = torch.empty(k, dtype=torch.long, device=points.device)
    generator = torch.Generator().manual_seed(seed)
    current = torch.randint(num_points, (1,), generator=generator).to(points.device)

    report_every = max(1, k // 100)
    bar = tqdm(total=k, desc="coreset", unit="pt", disable=not progress, mininterval=1.0)
    for step in range(k):
        selected[step] = current[0]
        center = points.index_select(0, current).squeeze(0)
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, the matrix-vector product fused into addmv.
        torch.addmv(squared_norms, points, center, alpha=-2.0, out=distances)
        distances.add_(squared_norms.index_select(0, current))
        torch.minimum(min_distances, distances, out=min_distances)
        # A picked point is never picked again, even among exact duplicates.
        min_distances.index_fill_(0, current, float("-inf"))
        current = torch.argmax(min_distances).view(1)
        if (step + 1) % report_every == 0 or step + 1 == k:
            bar.update(step + 1 - bar.n)
    bar.close()
    return selected


def coverage_radius(
    features: torch.Tensor, centers: torch.Tensor, chunk_size: int = 16384
) -> float:
    """Largest distance from any row of `features` to its nearest row of `centers` (chunked)."""
    radius = 0.0
    for start in range(0, features.shape[0], chunk_size):
        chunk = features[start : start + chunk_size].float()
        radius = max(radius, float(torch.cdist(chunk, centers.float()).min(dim=1).values.max()))
    return radius
