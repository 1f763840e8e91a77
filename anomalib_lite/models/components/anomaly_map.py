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
