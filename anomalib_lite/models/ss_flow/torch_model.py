"""Self-supervised normalizing flow (after the thesis "Self-Supervised Normalizing Flows for Image
Anomaly Detection and Localization"): a position-conditioned flow trained to give normal features
a high likelihood and synthetic anomalies a low one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.models.components import AnomalyOutput, FeatureExtractor, TrainableModel
from anomalib_lite.models.components.flows import conv_flow, gaussian_log_likelihood, positional_encoding_2d
from anomalib_lite.models.ss_flow.subnet import conv_attention_subnet
from anomalib_lite.schema import Levels


class SsFlowModel(TrainableModel):
    """Per level a 2D flow conditioned on a sinusoidal position code, on layer-normalised features.

    Couplings are FrEIA AllInOneBlocks; the position code is the block's condition (FrEIA
    concatenates it to the subnet input), the subnets stack convolution and self-attention with
    residual connections (`ConvAttentionSubnet`).

    Per-position density: d(p) = mean over channels of z(p)^2 (the Gaussian log-density of the
    flow output at p is -d(p)/2 per dimension, up to a constant).

    Loss (`self_supervised_loss`), chosen bound and why:
        L = NLL(normal) + anomaly_weight * mean over anomalous positions of max(0, margin - d(p)) / 2
    - NLL(normal): the exact per-dimension negative log-likelihood (z and log-determinant) of the
      normal images, as in every flow method: it keeps the model a density of normal features.
    - The anomalous term is a hinge on the log-density of synthetic-anomaly positions: it pushes
      them only until they are `margin` (in mean z^2; normal positions sit near 1) below normal,
      then contributes nothing. It is bounded in [0, margin/2] per position, so a few extreme
      synthetic patches cannot dominate the gradient, and the flow is never rewarded for sending
      anomalies to infinitely low likelihood (an unbounded -log p term would be, at the expense
      of the normal density). Positions whose feature cell is less than half covered by the
      synthetic mask count as neither.
    Map: per level exp(-d/2), upsampled and averaged over levels; anomaly = 1 - that. Score: max.
    With anomaly_weight = 0 it is the same flow trained on normal data only (the baseline).
    """

    def __init__(
        self,
        backbone: dict,
        levels: Levels = (2, 3),
        flow_steps: int = 8,
        condition_dim: int = 32,
        hidden_ratio: float = 1.0,
        attention_heads: int = 4,
        clamp: float = 2.0,
        anomaly_margin: float = 3.0,
        anomaly_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.feature_extractor = FeatureExtractor(levels=levels, **backbone)
        self.condition_dim = condition_dim
        self.anomaly_margin = anomaly_margin
        self.anomaly_weight = anomaly_weight
        subnets = [conv_attention_subnet(hidden_ratio, attention_heads)] * flow_steps
        # FrEIA only needs channel counts here: the couplings work at any map size.
        self.flows = nn.ModuleList(
            conv_flow((channels, 1, 1), subnets, clamp, condition_shape=(condition_dim, 1, 1))
            for channels in self.feature_extractor.channels
        )

    def encode(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(z, log|det J|) per level."""
        outputs = []
        for flow, feature in zip(self.flows, self.feature_extractor(images).values()):
            batch, _, height, width = feature.shape
            code = positional_encoding_2d(self.condition_dim, height, width).to(feature)
            condition = code.unsqueeze(0).expand(batch, -1, -1, -1)
            outputs.append(flow(F.layer_norm(feature, feature.shape[1:]), c=[condition]))
        return outputs

    @staticmethod
    def _normal_nll(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
        return (-gaussian_log_likelihood(z, log_jac_det) / z[0].numel()).mean()

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Per-dimension NLL of normal images, summed over levels (the validation signal)."""
        return sum(self._normal_nll(z, log_jac_det) for z, log_jac_det in self.encode(images))

    def self_supervised_loss(
        self, images: torch.Tensor, anomalous_images: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(total loss, anomalous term) for normal images and their synthetic-anomaly versions."""
        normal = self.loss(images)
        if self.anomaly_weight == 0:
            return normal, normal.new_zeros(())
        hinge_sum, count = normal.new_zeros(()), normal.new_zeros(())
        for z, _ in self.encode(anomalous_images):
            coverage = F.adaptive_avg_pool2d(masks.unsqueeze(1).float(), z.shape[-2:])[:, 0]
            anomalous = (coverage >= 0.5).to(z.dtype)  # a 0/1 weight: no data-dependent branch or sync
            density = z.pow(2).mean(dim=1)
            hinge_sum = hinge_sum + (0.5 * F.relu(self.anomaly_margin - density) * anomalous).sum()
            count = count + anomalous.sum()
        anomalous_term = hinge_sum / count.clamp_min(1)
        return normal + self.anomaly_weight * anomalous_term, anomalous_term.detach()

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        maps = []
        for z, _ in self.encode(images):
            likelihood = torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True))
            maps.append(F.interpolate(likelihood, size=images.shape[-2:], mode="bilinear", align_corners=False))
        anomaly_map = 1 - torch.cat(maps, dim=1).mean(dim=1)
        return AnomalyOutput(anomaly_map.flatten(1).amax(dim=1), anomaly_map)
