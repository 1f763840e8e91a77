"""EfficientAD (Batzner et al., "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024): a patch description network (PDN) teacher, a student PDN
and an autoencoder.

The networks follow the authors' code (nelson1425/EfficientAD, which the paper points to): the
PDN's layers (small: conv4-128, avgpool, conv4-256, avgpool, conv3-256, conv4-384; medium adds
width and two 1x1 convolutions), no padding, so every output sees a 33 x 33 patch; the student has
twice the teacher's channels (the first half regresses the teacher, the second the autoencoder);
the autoencoder compresses the image to a 64-dimensional bottleneck (six strided convolutions)
and decodes it by bilinear upsampling and convolutions to the PDN's output grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnomalyOutput,
    CalibratedOnNormalImages,
    PreparedOnTrainingImages,
    TrainableModel,
)
from anomalib_lite.schema import Range, Size

# Zero border added around the PDN's output grid before it is resized to the image: the grid
# lacks the 16 px each side that no 33 px patch is centred on (4 cells of stride 4).
MAP_PADDING = 4


def patch_description_network(out_channels: int, size: Literal["small", "medium"] = "small", padding: bool = False) -> nn.Sequential:
    """The PDN. `padding=True` only for distilling the teacher (output at 1/4 of the input, as the
    backbone descriptor it learns); the same weights then run unpadded."""
    pad = 1 if padding else 0
    if size == "small":
        layers = [
            nn.Conv2d(3, 128, 4, padding=3 * pad), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=pad),
            nn.Conv2d(128, 256, 4, padding=3 * pad), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=pad),
            nn.Conv2d(256, 256, 3, padding=pad), nn.ReLU(inplace=True),
            nn.Conv2d(256, out_channels, 4),
        ]
    elif size == "medium":
        layers = [
            nn.Conv2d(3, 256, 4, padding=3 * pad), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=pad),
            nn.Conv2d(256, 512, 4, padding=3 * pad), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=pad),
            nn.Conv2d(512, 512, 1), nn.ReLU(inplace=True),
            nn.Conv2d(512, 512, 3, padding=pad), nn.ReLU(inplace=True),
            nn.Conv2d(512, out_channels, 4), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 1),
        ]
    else:
        raise UserInputError(f"method.model_size must be 'small' or 'medium', got {size!r}")
    return nn.Sequential(*layers)


def pdn_output_size(input_size: tuple[int, int]) -> tuple[int, int]:
    """The unpadded PDN's output grid for an input size (the same for both sizes): 256 -> 56."""
    def side(n: int) -> int:
        n = (n - 3) // 2   # conv4, avgpool 2
        n = (n - 3) // 2   # conv4, avgpool 2
        return n - 2 - 3   # conv3, conv4
    return side(input_size[0]), side(input_size[1])


class AutoEncoder(nn.Module):
    """Encoder: six convolutions (five 4x4 of stride 2, then one spanning the remaining grid) to a
    1 x 1 x 64 bottleneck. Decoder: bilinear upsampling to growing grids, each followed by a 4x4
    convolution (padding 2: one more cell) with dropout 0.2, then two 3x3 convolutions to the
    PDN's output grid. At 256 px the grids are the authors' (3, 8, 15, 32, 63, 127, then 56); at
    other sizes they scale with the input."""

    def __init__(self, out_channels: int, input_size: tuple[int, int], bottleneck: int = 64) -> None:
        super().__init__()
        height, width = input_size
        if height % 32 or width % 32:
            raise UserInputError(f"EfficientAD's autoencoder needs an input size divisible by 32, got {height} x {width}")
        channels = (3, 32, 32, 64, 64, 64)
        encoder: list[nn.Module] = []
        for cin, cout in zip(channels[:-1], channels[1:]):
            encoder += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        encoder.append(nn.Conv2d(64, bottleneck, (height // 32, width // 32)))
        self.encoder = nn.Sequential(*encoder)
        scale_h, scale_w = height / 256, width / 256
        self.grids = [(max(1, round(g * scale_h)), max(1, round(g * scale_w))) for g in (3, 8, 15, 32, 63, 127)]
        self.output_size = pdn_output_size(input_size)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(bottleneck if i == 0 else 64, 64, 4, padding=2), nn.ReLU(inplace=True), nn.Dropout(0.2))
            for i in range(len(self.grids))
        )
        self.head = nn.Sequential(
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(64, out_channels, 3, padding=1)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.encoder(images)
        for grid, stage in zip(self.grids, self.stages):
            x = stage(F.interpolate(x, size=grid, mode="bilinear"))
        return self.head(F.interpolate(x, size=self.output_size, mode="bilinear"))


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile's linear interpolation over all elements, without its 16M-element limit
    (two `kthvalue` selections instead of a sort)."""
    flat = values.flatten()
    position = q * (flat.numel() - 1)
    low, fraction = math.floor(position), position - math.floor(position)
    below = flat.kthvalue(low + 1).values
    above = flat.kthvalue(min(low + 2, flat.numel())).values if fraction > 0 else below
    return below + fraction * (above - below)


class EfficientAdModel(TrainableModel, PreparedOnTrainingImages, CalibratedOnNormalImages):
    """Teacher (frozen, distilled beforehand: `efficient_ad.teacher`), student and autoencoder.

    Teacher outputs are standardised per channel with their mean and std over the training images
    (`prepare`). Student-teacher map: mean over channels of the squared difference between the
    teacher and the student's first half; autoencoder map: the same between the autoencoder and the
    student's second half. Each is mapped linearly so that its 0.9 quantile on held-out normal
    images goes to 0 and its 0.995 quantile to 0.1 (`calibrate`; the authors fit these on their
    validation split, as here), and the two are averaged. The map is zero-padded by 4 cells and
    resized (bilinear) to the image; the image score is its maximum (authors' code).
    """

    def __init__(
        self,
        image_size: Size,
        model_size: Literal["small", "medium"] = "small",
        out_channels: Annotated[int, Range(low=1)] = 384,
        hard_quantile: Annotated[float, Range(low=0, high=1, high_open=True)] = 0.999,
        calibration_quantiles: Sequence[float] = (0.9, 0.995),
        pad_calibrated: bool = True,
    ) -> None:
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if min(pdn_output_size(size)) < 1:
            raise UserInputError(f"EfficientAD needs images of at least 64 px (the PDN sees 33 px patches), got {size}")
        self.input_size = size
        self.model_size = model_size
        self.out_channels = out_channels
        self.hard_quantile = hard_quantile
        self.calibration_quantiles = tuple(calibration_quantiles)
        self.pad_calibrated = pad_calibrated
        self.teacher = patch_description_network(out_channels, model_size).requires_grad_(False)
        self.student = patch_description_network(2 * out_channels, model_size)
        self.autoencoder = AutoEncoder(out_channels, size)
        # The PDN and the autoencoder see ImageNet-normalised images (authors' code).
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("teacher_mean", torch.zeros(1, out_channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, out_channels, 1, 1))
        # Map calibration: (q_start, q_end) of the student-teacher and the autoencoder maps.
        self.register_buffer("map_quantiles", torch.full((2, 2), float("nan")))

    def train(self, mode: bool = True) -> EfficientAdModel:
        super().train(mode)
        self.teacher.eval()  # frozen
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def teacher_features(self, normalized: torch.Tensor) -> torch.Tensor:
        return (self.teacher(normalized) - self.teacher_mean) / self.teacher_std

    # -- teacher standardisation over the training images -------------------------------------------
    @torch.no_grad()
    def preparation_statistics(self, images: torch.Tensor) -> torch.Tensor:
        """Per image and channel: the mean of the raw teacher output and of its square (float64)."""
        features = self.teacher(self.normalize(images)).double()
        return torch.cat([features.mean(dim=(2, 3)), features.pow(2).mean(dim=(2, 3))], dim=1)

    def prepare(self, statistics: torch.Tensor) -> None:
        # The authors' two passes (mean, then the mean squared deviation) in one: equal-size images
        # make mean(E[x^2]) - mean(E[x])^2 the same quantity.
        mean, square = statistics.mean(dim=0).chunk(2)
        std = (square - mean.pow(2)).clamp_min(0).sqrt()
        self.teacher_mean.copy_(mean.float().view_as(self.teacher_mean))
        self.teacher_std.copy_(std.float().clamp_min(1e-6).view_as(self.teacher_std))

    # -- training -----------------------------------------------------------------------------------
    def training_terms(
        self, images: torch.Tensor, images_ae: torch.Tensor, penalty_images: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The authors' loss terms. `images_ae`: the same images colour-jittered (the autoencoder's
        and the student's second half's input); `penalty_images`: images from outside the training
        distribution (ImageNet in the paper) whose student outputs are pulled towards 0."""
        c = self.out_channels
        normalized, normalized_ae = self.normalize(images), self.normalize(images_ae)
        distance_st = (self.teacher_features(normalized) - self.student(normalized)[:, :c]).pow(2)
        # Hard-feature loss: only the largest 0.1 % of the squared differences.
        threshold = quantile(distance_st.detach(), self.hard_quantile)
        terms = {"hard": distance_st[distance_st >= threshold].mean()}
        if penalty_images is not None:
            terms["penalty"] = self.student(self.normalize(penalty_images))[:, :c].pow(2).mean()
        ae_output = self.autoencoder(normalized_ae)
        terms["ae"] = (self.teacher_features(normalized_ae) - ae_output).pow(2).mean()
        terms["student_ae"] = (ae_output - self.student(normalized_ae)[:, c:]).pow(2).mean()
        terms["loss"] = sum(terms.values())
        return terms

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Validation loss: the training terms without jitter or penalty images."""
        return self.training_terms(images, images)["loss"]

    # -- scoring --------------------------------------------------------------------------------------
    def calibration_maps(self, images: torch.Tensor) -> torch.Tensor:
        """B x 2 x h x w: the raw student-teacher and autoencoder maps on the PDN's output grid."""
        c = self.out_channels
        normalized = self.normalize(images)
        teacher, student = self.teacher_features(normalized), self.student(normalized)
        ae_output = self.autoencoder(normalized)
        map_st = (teacher - student[:, :c]).pow(2).mean(dim=1)
        map_ae = (ae_output - student[:, c:]).pow(2).mean(dim=1)
        return torch.stack([map_st, map_ae], dim=1)

    def calibrate(self, maps: torch.Tensor) -> None:
        low, high = self.calibration_quantiles
        for k in range(2):
            self.map_quantiles[k, 0] = quantile(maps[:, k], low)
            self.map_quantiles[k, 1] = quantile(maps[:, k], high)

    def calibrated(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps the calibration quantiles to 0 and 0.1 (raw maps until calibrated, as the authors' code)."""
        start, end = self.map_quantiles[:, 0].view(1, 2, 1, 1), self.map_quantiles[:, 1].view(1, 2, 1, 1)
        # A tensor choice, not an `if` on the buffer's values: an exported graph holds it.
        return torch.where(torch.isnan(self.map_quantiles).any(), maps, 0.1 * (maps - start) / (end - start).clamp_min(1e-12))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        maps = self.calibration_maps(images)
        if self.pad_calibrated:
            padded = F.pad(self.calibrated(maps).mean(dim=1, keepdim=True), (MAP_PADDING,) * 4)
        else:
            padded = self.calibrated(F.pad(maps, (MAP_PADDING,) * 4)).mean(dim=1, keepdim=True)
        anomaly_map = F.interpolate(padded, size=images.shape[-2:], mode="bilinear").squeeze(1)
        return AnomalyOutput(anomaly_map.flatten(1).amax(dim=1), anomaly_map)
