"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anomalib_lite.models.components import (
    AnomalyOutput,
    FeatureExtractor,
    MemoryBankModel,
    ResizableBuffersMixin,
    fit_position_gaussians,
    position_mahalanobis,
    smooth_anomaly_map,
)
from anomalib_lite.schema import Levels


class PadimModel(ResizableBuffersMixin, MemoryBankModel):
    """A multivariate Gaussian per feature-map position; Mahalanobis distance as anomaly score.

    Levels are concatenated at the first level's resolution (nearest upsampling), a seeded random
    subset of `num_features` channels is kept, and each position gets a mean and a covariance
    regularised by `covariance_eps` * I. The inverse covariances are stored, as inference needs.
    `num_features` = d, the paper's 100 (of ResNet-18's 448 channels; 550 of WRN-50-2's 1792).
    A covariance of d dimensions is estimated from as many samples as there are fitted images,
    so with fewer than about 2d images it is close to singular and `covariance_eps` dominates.
    """

    resizable_buffers = ("mean", "inv_covariance")

    def __init__(
        self,
        backbone: dict,
        levels: Levels = (1, 2, 3),
        num_features: int | None = 100,
        feature_seed: int = 0,
        covariance_eps: float = 0.01,
        blur_sigma: float = 4.0,
        fit_chunk_size: int = 256,
    ) -> None:
        super().__init__()
        self.feature_extractor = FeatureExtractor(levels=levels, **backbone)
        total = sum(self.feature_extractor.channels)
        num_kept = total if num_features is None else min(num_features, total)
        generator = torch.Generator().manual_seed(feature_seed)
        self.register_buffer("feature_index", torch.randperm(total, generator=generator)[:num_kept].sort().values)
        self.covariance_eps = covariance_eps
        self.blur_sigma = blur_sigma
        self.fit_chunk_size = fit_chunk_size
        self.register_buffer("mean", torch.empty(0))  # d x (h*w)
        self.register_buffer("inv_covariance", torch.empty(0))  # (h*w) x d x d

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x d x h x w (h, w of the first level).

        The same as selecting `feature_index` from the concatenation of all levels upsampled to
        the first level; each level's share of the channels is selected first, at its own (smaller)
        resolution, so only the kept channels are upsampled and copied.
        """
        maps = list(self.feature_extractor(images).values())
        size = maps[0].shape[-2:]
        selected, offset = [], 0
        for level_map in maps:
            channels = level_map.shape[1]
            index = self.feature_index[(self.feature_index >= offset) & (self.feature_index < offset + channels)] - offset
            level_map = level_map.index_select(1, index)
            if level_map.shape[-2:] != size:
                level_map = F.interpolate(level_map, size=size, mode="nearest")
            selected.append(level_map)
            offset += channels
        return torch.cat(selected, dim=1).contiguous()

    def fit(self, embeddings: torch.Tensor) -> None:
        """Per-position Gaussian from N x d x h x w training embeddings (positions in chunks)."""
        if embeddings.shape[0] < 2:
            raise ValueError("PaDiM needs at least 2 training images to estimate a covariance")
        self.mean, self.inv_covariance = fit_position_gaussians(embeddings, self.covariance_eps, self.fit_chunk_size)

    def mahalanobis(self, embedding: torch.Tensor) -> torch.Tensor:
        """B x d x h x w embeddings -> B x h x w Mahalanobis distances to each position's Gaussian."""
        return position_mahalanobis(embedding, self.mean, self.inv_covariance)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.mean.numel() == 0:
            raise RuntimeError("PaDiM is not fitted: fit it before inference")
        distance_map = self.mahalanobis(self.embed(images))
        anomaly_map = smooth_anomaly_map(distance_map, images.shape[-2:], self.blur_sigma)
        return AnomalyOutput(anomaly_map.flatten(1).amax(dim=1), anomaly_map)
