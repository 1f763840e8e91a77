"""FastFlow (Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D
Normalizing Flows", 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.models.components import AnomalyOutput, FeatureExtractor, TrainableModel
from anomalib_lite.models.components.flows import conv_flow, conv_subnet, gaussian_log_likelihood
from anomalib_lite.schema import Levels


class FastflowModel(TrainableModel):
    """A 2D flow per backbone level on layer-normalised feature maps.

    Each flow has `flow_steps` FrEIA coupling blocks whose subnets alternate 3x3 and 1x1
    convolutions (all 3x3 with `conv3x3_only`, the paper's choice for transformer features).
    Loss: the negative log-likelihood of the maps under N(0, I) after the flow, summed over levels.
    Map: per level, the likelihood of each position (exp of the mean per-channel log-density of
    z), upsampled to the image and averaged over levels; anomaly = minus that. Score: map maximum.

    The layer normalisation has no learnable affine: a trainable scale in front of the flow sits
    outside the log-determinant and could shrink the features to lower the loss for free.
    """

    def __init__(
        self,
        backbone: dict,
        levels: Levels = (1, 2, 3),
        flow_steps: int = 8,
        hidden_ratio: float = 1.0,
        conv3x3_only: bool = False,
        clamp: float = 2.0,
    ) -> None:
        super().__init__()
        self.feature_extractor = FeatureExtractor(levels=levels, **backbone)
        subnets = [conv_subnet(3 if conv3x3_only or step % 2 == 0 else 1, hidden_ratio) for step in range(flow_steps)]
        # FrEIA only needs the channel count: the convolutional couplings work at any map size.
        self.flows = nn.ModuleList(conv_flow((channels, 1, 1), subnets, clamp) for channels in self.feature_extractor.channels)

    def encode(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(z, log|det J|) per level."""
        features = self.feature_extractor(images).values()
        outputs = []
        for flow, feature in zip(self.flows, features):
            z, log_jac_det = flow(F.layer_norm(feature, feature.shape[1:]))
            outputs.append((z, log_jac_det))
        return outputs

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood per image (nats), summed over levels, averaged over the batch."""
        return sum(-gaussian_log_likelihood(z, log_jac_det).mean() for z, log_jac_det in self.encode(images))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        maps = []
        for z, _ in self.encode(images):
            likelihood = torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True))
            maps.append(F.interpolate(-likelihood, size=images.shape[-2:], mode="bilinear", align_corners=False))
        anomaly_map = torch.cat(maps, dim=1).mean(dim=1)
        return AnomalyOutput(anomaly_map.flatten(1).amax(dim=1), anomaly_map)
