"""What every method returns, and the shared map post-processing (upsample + Gaussian blur)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d


class AnomalyOutput(NamedTuple):
    """One result type for every method in eval mode: callbacks never special-case a method."""

    pred_score: torch.Tensor  # B, higher = more anomalous
    anomaly_map: torch.Tensor  # B x H x W at input resolution


def smooth_anomaly_map(patch_scores: torch.Tensor, image_size: tuple[int, int], sigma: float) -> torch.Tensor:
    """B x h x w patch scores -> B x H x W map: bilinear upsampling, then a Gaussian blur."""
    anomaly_map = F.interpolate(patch_scores.unsqueeze(1), size=image_size, mode="bilinear", align_corners=False)
    return blur_anomaly_map(anomaly_map.squeeze(1), sigma)


def blur_anomaly_map(anomaly_map: torch.Tensor, sigma: float) -> torch.Tensor:
    """B x H x W -> the same, blurred by a Gaussian of `sigma` pixels (none for sigma 0)."""
    if sigma <= 0:
        return anomaly_map
    kernel_size = 2 * int(4.0 * sigma + 0.5) + 1  # +-4 sigma, as in the reference implementations
    return gaussian_blur2d(anomaly_map.unsqueeze(1), (kernel_size, kernel_size), (sigma, sigma)).squeeze(1)


def average_over_patches(
    patch_scores: torch.Tensor, image_size: tuple[int, int], patch_size: int, rows: list[int], columns: list[int]
) -> torch.Tensor:
    """B x I x J scores of the patch_size x patch_size patches at offsets rows x columns -> B x H x W
    map where each pixel is the mean score of the patches that cover it (0 where none does).

    A patch covers (y, x) exactly when it covers row y and column x, so with the 0/1 matrices
    R (H x I: does patch row i cover y?) and C (W x J) the sums are R S C^T: two matrix products.
    """
    height, width = image_size
    device, dtype = patch_scores.device, patch_scores.dtype

    def cover(size: int, offsets: list[int]) -> torch.Tensor:
        pixel = torch.arange(size, device=device).view(-1, 1)
        start = torch.tensor(offsets, device=device).view(1, -1)
        return ((pixel >= start) & (pixel < start + patch_size)).to(dtype)

    row_cover, column_cover = cover(height, rows), cover(width, columns)
    total = row_cover @ patch_scores @ column_cover.T
    count = row_cover.sum(dim=1, keepdim=True) * column_cover.sum(dim=1)  # H x W
    return total / count.clamp_min(1)
