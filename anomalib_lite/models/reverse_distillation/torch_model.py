"""Reverse Distillation (Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class
Embedding", CVPR 2022)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components import AnomalyOutput, FeatureExtractor, TrainableModel
from anomalib_lite.models.components.anomaly_map import blur_anomaly_map
from anomalib_lite.models.components.distillation import (
    cosine_distance,
    flattened_cosine_distance,
    fuse_level_maps,
)
from anomalib_lite.schema import Fraction, Levels, NonNegative, Positive


def _resampling_convs(in_channels: int, out_channels: int, kernel: int, resample: Literal["down", "up"] | None) -> nn.Module:
    """A convolution that halves the resolution ("down": stride 2), doubles it ("up": a stride-2
    2x2 transposed convolution, as in the authors' decoder) or keeps it."""
    if resample == "up":
        return nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False)
    return nn.Conv2d(in_channels, out_channels, kernel, stride=2 if resample == "down" else 1, padding=kernel // 2, bias=False)


class ResidualBlock(nn.Module):
    """A ResNet block with BatchNorm and a residual connection, optionally changing the resolution
    by 2 (`resample`). `kind` "bottleneck": 1x1 -> 3x3 -> 1x1 with `hidden_channels` in the middle
    (ResNet-50 and wider); "basic": 3x3 -> 3x3 (ResNet-18/34). The resampling sits in the middle
    (bottleneck) or first (basic) convolution, as in the authors' code. `activation` False leaves
    out the final ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, hidden_channels: int, kind: Literal["bottleneck", "basic"] = "bottleneck",
        resample: Literal["down", "up"] | None = None, activation: bool = True,
    ) -> None:
        super().__init__()
        if kind == "bottleneck":
            layers = [
                nn.Conv2d(in_channels, hidden_channels, 1, bias=False), nn.BatchNorm2d(hidden_channels), nn.ReLU(inplace=True),
                _resampling_convs(hidden_channels, hidden_channels, 3, resample), nn.BatchNorm2d(hidden_channels),
                nn.ReLU(inplace=True), nn.Conv2d(hidden_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
            ]
        else:
            layers = [
                _resampling_convs(in_channels, out_channels, 3, resample), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
            ]
        self.residual = nn.Sequential(*layers)
        changes = resample is not None or in_channels != out_channels
        self.shortcut = (
            nn.Sequential(_resampling_convs(in_channels, out_channels, 1, resample), nn.BatchNorm2d(out_channels))
            if changes else nn.Identity()
        )
        self.activation = nn.ReLU(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.residual(x) + self.shortcut(x))


def residual_stage(
    in_channels: int, out_channels: int, blocks: int, kind: Literal["bottleneck", "basic"], hidden_ratio: float,
    resample: Literal["down", "up"], final_activation: bool = True,
) -> nn.Sequential:
    hidden = max(1, round(out_channels * hidden_ratio))
    return nn.Sequential(*(
        ResidualBlock(
            in_channels if index == 0 else out_channels, out_channels, hidden, kind, resample if index == 0 else None,
            activation=final_activation or index < blocks - 1,
        )
        for index in range(blocks)
    ))


def conv_bn_relu_down(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
    )


class OneClassBottleneck(nn.Module):
    """OCBE: every level but the last brought down to the last level's resolution and channels by
    stride-2 3x3 convolutions (through the channel counts of the levels between), concatenated
    with the last level, then a residual stage at stride 2 with twice the last level's channels."""

    def __init__(self, channels: Sequence[int], blocks: int, kind: Literal["bottleneck", "basic"], hidden_ratio: float) -> None:
        super().__init__()
        self.fusions = nn.ModuleList(
            nn.Sequential(*(conv_bn_relu_down(channels[step], channels[step + 1]) for step in range(index, len(channels) - 1)))
            for index in range(len(channels) - 1)
        )
        self.out_channels = 2 * channels[-1]
        self.embed = residual_stage(len(channels) * channels[-1], self.out_channels, blocks, kind, hidden_ratio, "down")

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        fused = [fusion(feature) for fusion, feature in zip(self.fusions, features[:-1])]
        return self.embed(torch.cat([*fused, features[-1]], dim=1))


class ReverseDistillationModel(TrainableModel):
    """A frozen pretrained encoder (the teacher), a trainable one-class bottleneck embedding (OCBE)
    of its multi-scale features, and a trainable decoder (the student) that mirrors the encoder:
    from the embedding back to every level, each stage upsampling by 2 with residual blocks.

    Blocks are ResNet bottlenecks whose middle width is `hidden_ratio` x their output (0.5 is
    WideResNet-50-2's, the paper's backbone; with `bottleneck_blocks: 3` and `decoder_blocks:
    [3, 4, 6]` the networks are the authors' for it), or ResNet basic blocks (`block: basic`,
    `bottleneck_blocks: 2`, `decoder_blocks: [2, 2, 2]`: the authors' for ResNet-18). The
    decoder's stage outputs end in a ReLU where the encoder's features are non-negative (ResNets:
    post-ReLU), as in the authors' code; for an encoder whose features take negative values
    (EfficientNet's linear bottlenecks) the last ReLU of each stage is left out, or the decoder
    could not reproduce them.

    Loss, per level, summed over levels: `loss: flattened` (the authors' code, the default) is
    1 - cosine similarity of each image's whole feature map taken as one vector; `per_position`
    (the paper's equation 2) is 1 - cosine similarity at each position, averaged over positions.
    Map: the per-position 1 - cosine similarity at each level, upsampled to the image (bilinear,
    align_corners as in the authors' code), summed over levels, blurred (Gaussian, sigma
    `blur_sigma` = 4). Score: map maximum.
    """

    def __init__(
        self,
        backbone: dict,
        levels: Levels = (1, 2, 3),
        bottleneck_blocks: Annotated[int, Positive] = 3,
        decoder_blocks: Annotated[Sequence[int], Positive] = (3, 4, 6),
        block: Literal["bottleneck", "basic"] = "bottleneck",
        hidden_ratio: Annotated[float, Fraction] = 0.5,
        loss: Literal["flattened", "per_position"] = "flattened",
        blur_sigma: Annotated[float, NonNegative] = 4.0,
    ) -> None:
        super().__init__()
        levels = list(levels)
        if len(levels) < 2 or levels != list(range(levels[0], levels[0] + len(levels))):
            raise UserInputError(f"reverse_distillation needs at least two consecutive levels, e.g. [1, 2, 3]; got {levels}")
        if len(decoder_blocks) != len(levels):
            raise UserInputError(
                f"method.decoder_blocks has {len(decoder_blocks)} entries, one per level is needed ({len(levels)} levels)"
            )
        self.encoder = FeatureExtractor(levels=levels, **backbone)
        channels = list(self.encoder.channels)
        self.bottleneck = OneClassBottleneck(channels, bottleneck_blocks, block, hidden_ratio)
        final_activation = self._features_are_non_negative()
        # Coarsest stage first: bottleneck -> last level -> ... -> first level.
        outputs = channels[::-1]
        inputs = [self.bottleneck.out_channels, *outputs[:-1]]
        self.decoder = nn.ModuleList(
            residual_stage(c_in, c_out, blocks, block, hidden_ratio, "up", final_activation)
            for c_in, c_out, blocks in zip(inputs, outputs, decoder_blocks)
        )
        self.loss_kind = loss
        self.blur_sigma = blur_sigma
        for module in [self.bottleneck, self.decoder]:
            for layer in module.modules():
                if isinstance(layer, nn.Conv2d):  # the authors' initialisation (transposed convolutions keep torch's)
                    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")

    @torch.no_grad()
    def _features_are_non_negative(self) -> bool:
        probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        return all(bool((feature >= 0).all()) for feature in self.encoder(probe).values())

    def features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The encoder's features and the decoder's reconstructions of them, finest level first."""
        encoded = list(self.encoder(images).values())
        x = self.bottleneck(encoded)
        decoded = []
        for stage, target in zip(self.decoder, encoded[::-1]):
            x = stage(x)
            if x.shape[-2:] != target.shape[-2:]:  # sizes that do not halve evenly (padded strides round up)
                x = F.interpolate(x, size=target.shape[-2:], mode="bilinear", align_corners=False)
            decoded.append(x)
        return encoded, decoded[::-1]

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        encoded, decoded = self.features(images)
        if self.loss_kind == "flattened":
            return sum(flattened_cosine_distance(e, d).mean() for e, d in zip(encoded, decoded))
        return sum(cosine_distance(e, d).mean() for e, d in zip(encoded, decoded))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        encoded, decoded = self.features(images)
        maps = [cosine_distance(e, d) for e, d in zip(encoded, decoded)]
        anomaly_map = fuse_level_maps(maps, tuple(images.shape[-2:]), reduce="sum", align_corners=True)
        anomaly_map = blur_anomaly_map(anomaly_map, self.blur_sigma)
        return AnomalyOutput(anomaly_map.flatten(1).amax(dim=1), anomaly_map)
