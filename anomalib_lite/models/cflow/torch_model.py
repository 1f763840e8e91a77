"""CFLOW-AD (Gudovskiy et al., "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with
Localization via Conditional Normalizing Flows", WACV 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.models.components import AnomalyOutput, FeatureExtractor, TrainableModel
from anomalib_lite.models.components.flows import gaussian_log_likelihood, positional_encoding_2d, vector_flow
from anomalib_lite.schema import Levels


class CflowModel(TrainableModel):
    """One conditional flow per level on the feature vectors of single positions ("fibers").

    Each position's C-dim feature is decoded by that level's flow conditioned on the 2D sinusoidal
    encoding of its (x, y). The objective per fiber is -log sigmoid(log p(x | pos) / C) (the paper's
    code), minimised over random batches of fibers drawn from all images and positions.
    Map: per level, exp(log p / C - offset), bilinearly upsampled and summed over levels; the
    anomaly map is (number of levels - that sum). The paper's code takes `offset` as the maximum
    log-likelihood over the test set (or batch), which makes an image's score depend on the other
    test images; here it is the maximum seen on training fibers in the last fitted epoch, a
    constant stored with the model. Score: the map's maximum.
    """

    def __init__(
        self,
        backbone: dict,
        levels: Levels = (2, 3, 4),
        condition_dim: int = 128,
        coupling_blocks: int = 8,
        clamp: float = 1.9,
        permute_soft: bool = False,
    ) -> None:
        super().__init__()
        self.feature_extractor = FeatureExtractor(levels=levels, **backbone)
        self.condition_dim = condition_dim
        self.decoders = nn.ModuleList(
            vector_flow(channels, condition_dim, coupling_blocks, clamp, permute_soft=permute_soft)
            for channels in self.feature_extractor.channels
        )
        self.register_buffer("likelihood_offset", torch.zeros(len(self.decoders)))

    def fibers(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        """Per level: (B*h*w) x C features, (B*h*w) x condition_dim position codes, and (h, w)."""
        levels = []
        for feature in self.feature_extractor(images).values():
            batch, channels, height, width = feature.shape
            code = positional_encoding_2d(self.condition_dim, height, width).to(feature)
            conditions = code.flatten(1).T.repeat(batch, 1)  # rows ordered (b, y, x) like the features
            levels.append((feature.permute(0, 2, 3, 1).reshape(-1, channels), conditions, (height, width)))
        return levels

    def log_likelihood_per_dim(self, level: int, features: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """log p(feature | position) / C for each fiber (N,)."""
        z, log_jac_det = self.decoders[level](features, c=[conditions])
        return gaussian_log_likelihood(z, log_jac_det) / features.shape[1]

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """The training objective over every fiber of the batch (sum over levels of the means)."""
        total = images.new_zeros(())
        for level, (features, conditions, _) in enumerate(self.fibers(images)):
            total = total - F.logsigmoid(self.log_likelihood_per_dim(level, features, conditions)).mean()
        return total

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        batch = images.shape[0]
        likelihood = images.new_zeros(batch, *images.shape[-2:])
        for level, (features, conditions, (height, width)) in enumerate(self.fibers(images)):
            log_likelihood = self.log_likelihood_per_dim(level, features, conditions).reshape(batch, 1, height, width)
            probability = torch.exp(log_likelihood - self.likelihood_offset[level])
            likelihood += F.interpolate(probability, size=images.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
        anomaly_map = len(self.decoders) - likelihood
        return AnomalyOutput(anomaly_map.flatten(1).amax(dim=1), anomaly_map)
