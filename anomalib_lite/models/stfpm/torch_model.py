"""STFPM (Wang et al., "Student-Teacher Feature Pyramid Matching for Anomaly Detection", BMVC 2021)."""

from __future__ import annotations

from typing import Annotated

import torch

from anomalib_lite.models.components import (
    AnomalyOutput,
    FeatureExtractor,
    TrainableModel,
    smooth_anomaly_map,
)
from anomalib_lite.models.components.distillation import fuse_level_maps, normalized_squared_distance
from anomalib_lite.schema import Levels, Range


class StfpmModel(TrainableModel):
    """A frozen pretrained teacher and a student of the same architecture, randomly initialised,
    trained to reproduce the teacher's channel-normalised features at every level.

    Loss: per level, the squared L2 distance of the channel-normalised feature vectors, summed
    over channels and averaged over images and positions; summed over levels. The authors' code
    (gdwang08/STFPM) adds the levels as they are (`loss_factor: 1.0`, the default); the paper's
    equation has a factor 1/2 (`loss_factor: 0.5`), which only rescales the gradient.
    Map: the same per-position distance at each level, upsampled to the first level's resolution,
    multiplied over levels, then upsampled to the image (the authors' code). Score: map maximum.
    """

    def __init__(self, backbone: dict, levels: Levels = (1, 2, 3), loss_factor: Annotated[float, Range(low=0, low_open=True)] = 1.0) -> None:
        super().__init__()
        self.teacher = FeatureExtractor(levels=levels, **backbone)
        self.student = FeatureExtractor(levels=levels, **{**backbone, "weights": "none", "frozen": False})
        self.loss_factor = loss_factor

    def distances(self, images: torch.Tensor) -> list[torch.Tensor]:
        """B x h x w per level: squared distance of the normalised teacher and student features."""
        teacher, student = self.teacher(images), self.student(images)
        return [normalized_squared_distance(teacher[level], student[level]) for level in teacher]

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        return self.loss_factor * sum(distance.mean() for distance in self.distances(images))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        distances = self.distances(images)
        finest = max((distance.shape[-2:] for distance in distances), key=lambda size: size[0] * size[1])
        product = fuse_level_maps(distances, tuple(finest), reduce="product")
        anomaly_map = smooth_anomaly_map(product, tuple(images.shape[-2:]), sigma=0)  # upsampled, no blur (authors' code)
        return AnomalyOutput(anomaly_map.flatten(1).amax(dim=1), anomaly_map)
