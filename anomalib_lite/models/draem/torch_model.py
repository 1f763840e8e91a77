"""DRAEM (Zavrtanik et al., ICCV 2021): a reconstructive and a discriminative sub-network.

The reconstructive network learns to turn images with synthetic anomalies back into the clean
images; the discriminative network sees the input and its reconstruction side by side and learns
to segment where they differ because of an anomaly. Both are trained on synthetic anomalies only
(`data.anomaly_synthesis.PerlinSynthesizer`) and see inputs in [0, 1], the space the anomalies
are made in (no ImageNet normalisation).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.models.components import AnomalyOutput, TrainableModel
from anomalib_lite.models.draem.loss import DraemLoss
from anomalib_lite.schema import PositiveInt


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def _double_conv(in_channels: int, out_channels: int, middle_channels: int | None = None) -> nn.Sequential:
    """conv3-BN-ReLU x 2 (the first to `middle_channels`, default `out_channels`)."""
    middle = middle_channels or out_channels
    return nn.Sequential(*_conv_bn_relu(in_channels, middle), *_conv_bn_relu(middle, out_channels))


def _upsample(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    # The authors' Upsample(scale_factor=2, bilinear, align_corners=True), to the encoder level's
    # size: the same values for sides divisible by the pooling factor, and any other side works.
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ReconstructiveSubNetwork(nn.Module):
    """Encoder-decoder without skip connections (the authors' widths: 128 -> 256/512/1024/1024).

    Encoder: 5 blocks of 2 x (conv3-BN-ReLU), widths w, 2w, 4w, 8w, 8w, with a 2 x 2 max-pool
    between blocks (four). Decoder: per level, bilinear x2 upsampling + conv3-BN-ReLU, then 2 x
    (conv3-BN-ReLU) halving the width (8w -> 4w -> 2w -> w -> w); a final conv3 to RGB.
    """

    def __init__(self, width: int = 128, in_channels: int = 3, out_channels: int = 3) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.encoder = nn.ModuleList(_double_conv(a, b) for a, b in zip([in_channels, *widths[:-1]], widths))
        decoder_widths = [(8 * width, 4 * width), (4 * width, 2 * width), (2 * width, width), (width, width)]
        self.up = nn.ModuleList(nn.Sequential(*_conv_bn_relu(a, a)) for a, _ in decoder_widths)
        self.decoder = nn.ModuleList(_double_conv(a, b, middle_channels=a) for a, b in decoder_widths)
        self.head = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, sizes = images, []
        for index, block in enumerate(self.encoder):
            if index:
                sizes.append(x.shape[-2:])
                x = F.max_pool2d(x, 2)
            x = block(x)
        for up, block, size in zip(self.up, self.decoder, reversed(sizes)):
            x = block(up(_upsample(x, size)))
        return self.head(x)


class DiscriminativeSubNetwork(nn.Module):
    """U-Net over concat(reconstruction, input) -> 2-class logits (the authors' width 64).

    Encoder: 6 blocks of 2 x (conv3-BN-ReLU), widths w, 2w, 4w, 8w, 8w, 8w, max-pools between
    (five). Decoder: per level, upsampling + conv3-BN-ReLU, concatenation with the encoder block
    of that size, 2 x (conv3-BN-ReLU); widths 8w, 4w, 2w, w, w; a final conv3 to 2 channels.
    """

    def __init__(self, width: int = 64, in_channels: int = 6, out_channels: int = 2) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width, 8 * width]
        self.encoder = nn.ModuleList(_double_conv(a, b) for a, b in zip([in_channels, *widths[:-1]], widths))
        # (upsampled input width, output width, skip width) per level, from the bottom up.
        levels = [(8 * width, 8 * width, 8 * width), (8 * width, 4 * width, 8 * width), (4 * width, 2 * width, 4 * width),
                  (2 * width, width, 2 * width), (width, width, width)]
        self.up = nn.ModuleList(nn.Sequential(*_conv_bn_relu(a, b)) for a, b, _ in levels)
        self.decoder = nn.ModuleList(_double_conv(b + skip, b) for _, b, skip in levels)
        self.head = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, block in enumerate(self.encoder):
            if index:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = block(torch.cat([up(_upsample(x, skip.shape[-2:])), skip], dim=1))
        return self.head(x)


Init = Literal["authors", "torch"]


def _init_weights(module: nn.Module) -> None:
    """The authors' initialisation: conv weights N(0, 0.02); BN scales N(1, 0.02), shifts 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DraemModel(TrainableModel):
    """Reconstructive + discriminative sub-networks; map = softmax anomaly channel.

    Image score (authors' code and paper): the maximum of the map after a
    `mean_filter_size` x `mean_filter_size` mean filter (stride 1, zero padding counted), so that
    one hot pixel does not decide an image. `reconstruction_width` / `discriminative_width` are
    the paper's 128 / 64; smaller widths fit a CPU (`experiment=draem_small`).
    `init`: "authors" (their code: conv weights N(0, 0.02), BN scales N(1, 0.02)) or "torch"
    (PyTorch's default initialisation, which anomalib's DraemModel keeps). `focal_alpha`: None (the
    authors': no class weighting) or the anomalous pixels' weight, normal ones getting 1 - alpha
    (anomalib 2.7's 1.0 leaves normal pixels out of the segmentation loss: experiments/SYNTHESIS.md).
    """

    def __init__(
        self,
        reconstruction_width: PositiveInt = 128,
        discriminative_width: PositiveInt = 64,
        mean_filter_size: PositiveInt = 21,
        ssim_window: PositiveInt = 11,
        focal_gamma: float = 2.0,
        init: Init = "authors",
        focal_alpha: float | None = None,
    ) -> None:
        super().__init__()
        if init not in get_args(Init):
            raise ValueError(f"init must be one of {get_args(Init)}, got {init!r}")
        self.reconstructive = ReconstructiveSubNetwork(reconstruction_width)
        self.discriminative = DiscriminativeSubNetwork(discriminative_width)
        self.mean_filter_size = mean_filter_size
        self.criterion = DraemLoss(ssim_window, focal_gamma, focal_alpha)
        if init == "authors":
            self.apply(_init_weights)
        # Channels-last: ~20 % faster on a CPU (oneDNN), the same results to float rounding.
        self.to(memory_format=torch.channels_last)

    def reconstruct_and_segment(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction B x 3 x H x W, segmentation logits B x 2 x H x W)."""
        images = images.contiguous(memory_format=torch.channels_last)
        reconstruction = self.reconstructive(images)
        return reconstruction, self.discriminative(torch.cat([reconstruction, images], dim=1))

    def training_loss(self, clean: torch.Tensor, augmented: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms for images with synthetic anomalies (`augmented`), their clean versions and masks."""
        reconstruction, logits = self.reconstruct_and_segment(augmented)
        return self.criterion(reconstruction, clean, logits, masks)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """The objective on normal images: reconstruct them and segment nothing."""
        return self.training_loss(images, images, images.new_zeros(images.shape[0], *images.shape[-2:]))["loss"]

    def image_scores(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Max of the mean-filtered map, per image (B x H x W -> B)."""
        size = self.mean_filter_size
        smoothed = F.avg_pool2d(anomaly_map.unsqueeze(1), size, stride=1, padding=size // 2)
        return smoothed.flatten(1).amax(dim=1)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        _, logits = self.reconstruct_and_segment(images)
        anomaly_map = torch.softmax(logits, dim=1)[:, 1]
        return AnomalyOutput(self.image_scores(anomaly_map), anomaly_map)
