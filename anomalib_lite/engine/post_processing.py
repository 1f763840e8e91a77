"""What turns a model's raw output into verdicts and pictures: the thresholds and the heatmaps'
colour scale, fitted on held-out images (never the test set) and applied to every test or
predicted image. A module of the method (`AnomalyModule.post_processor`): its buffers travel in
the checkpoint, and an exported model carries it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

COLOUR_SCALE_QUANTILE = 0.999  # of the validation maps: the top of the heatmaps' colour scale
BUFFERS = ("image_threshold", "pixel_threshold", "pixel_floor", "pixel_ceiling")


class PostProcessor(nn.Module):
    """Image and pixel thresholds, and the colour scale (floor, pixel threshold, top).

    `fit` takes the validation set: its normal images fix the thresholds (the largest score seen
    on them: no false positive there) and the scale's floor (their median pixel); every
    validation map (normal images and their synthetic anomalies) the scale's top.
    """

    image_threshold: torch.Tensor
    pixel_threshold: torch.Tensor
    pixel_floor: torch.Tensor
    pixel_ceiling: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        for name in BUFFERS:
            self.register_buffer(name, torch.tensor(float("nan")))

    @property
    def is_fitted(self) -> bool:
        return not bool(torch.isnan(self.image_threshold))

    @torch.no_grad()
    def fit(self, scores: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor) -> None:
        """Fit on the validation set: image scores (N), maps (N x H x W), labels (N, 0 = normal)."""
        normal = labels == 0
        self.fit_thresholds(scores[normal], maps[normal])
        self.fit_colour_scale(maps)

    @torch.no_grad()
    def fit_thresholds(self, normal_scores: torch.Tensor, normal_maps: torch.Tensor) -> None:
        """Thresholds = the largest score seen on held-out normal data (no false positive there).

        The colour scale's bottom is the median normal pixel; its middle, the pixel threshold.
        """
        self.image_threshold.fill_(float(normal_scores.max()))
        self.pixel_threshold.fill_(float(normal_maps.max()))
        self.pixel_floor.fill_(float(normal_maps.flatten().median()))

    @torch.no_grad()
    def fit_colour_scale(self, validation_maps: torch.Tensor) -> None:
        """The top of the heatmaps' colour scale: the 99.9th percentile of every validation map, the
        held-out normal images and their synthetic anomalies (no test label), so that defects scoring
        like the synthetic ones show their shape instead of saturating; at least as high as the
        symmetric scale (threshold + (threshold - floor)) it replaces."""
        self.pixel_ceiling.fill_(max(upper_quantile(validation_maps), float(2 * self.pixel_threshold - self.pixel_floor)))

    def forward(self, pred_score: torch.Tensor, anomaly_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(verdicts, normalised maps): `is_anomalous` and `normalize_anomaly_map`, in tensor
        operations only, so an exported graph carries them."""
        return self.is_anomalous(pred_score), self.normalize_anomaly_map(anomaly_map)

    def is_anomalous(self, scores: torch.Tensor) -> torch.Tensor:
        """The image verdicts: score above the image threshold."""
        return scores > self.image_threshold

    def _top(self) -> torch.Tensor:
        # Checkpoints from before the top was fitted: the symmetric scale, threshold + (threshold - floor).
        ceiling, threshold = self.pixel_ceiling, self.pixel_threshold
        return torch.where(torch.isnan(ceiling) | (ceiling <= threshold), 2 * threshold - self.pixel_floor, ceiling)

    def colour_scale(self) -> tuple[float, float, float]:
        """(bottom, middle = pixel threshold, top) of the heatmaps' colour scale, in the map's units."""
        if torch.isnan(self.pixel_threshold):
            raise RuntimeError("normalisation is not fitted: run validation before test")
        return float(self.pixel_floor), float(self.pixel_threshold), float(self._top())

    def normalize_anomaly_map(self, anomaly_map: torch.Tensor, top: float | None = None) -> torch.Tensor:
        """Map scores onto [0, 1] with the validation-fitted scale (same for every test image):
        piecewise linear, the floor to 0, the pixel threshold to 0.5, the top (the fitted one, or
        the one given) to 1."""
        floor, threshold = self.pixel_floor, self.pixel_threshold
        top_value = self._top() if top is None else torch.tensor(top, dtype=threshold.dtype, device=threshold.device)
        below = (anomaly_map - floor) / (threshold - floor).clamp_min(1e-12) * 0.5
        above = 0.5 + (anomaly_map - threshold) / (top_value - threshold).clamp_min(1e-12) * 0.5
        return torch.where(anomaly_map <= threshold, below, above).clamp(0, 1)


def upper_quantile(values: torch.Tensor, quantile: float = COLOUR_SCALE_QUANTILE) -> float:
    """The `quantile` of all of `values` (an order statistic, as the colour scale uses it)."""
    flat = values.flatten().float()
    return float(flat.kthvalue(max(1, math.ceil(quantile * flat.numel()))).values)


def migrate_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "post_processor.") -> None:
    """Checkpoints written before the post-processor was a module held its buffers at the top level
    (and, before the colour scale had a top, no `pixel_ceiling`): renamed in place."""
    for name in BUFFERS:
        if name in state_dict:
            state_dict[prefix + name] = state_dict.pop(name)
    state_dict.setdefault(prefix + "pixel_ceiling", torch.tensor(float("nan")))
