"""MNAD, reconstruction variant (Park et al., CVPR 2020, "Learning memory-guided normality for
anomaly detection").

An encoder turns the image into a map of queries (L2-normalised per position); each query reads
from a memory of M = 10 prototype items (`components.memory.MNADMemory`) and the decoder
reconstructs the image from concat(query, read). The memory is moved by an update rule during
training (no gradient); the loss is the reconstruction MSE + 0.1 x compactness (each query near
its nearest item) + 0.1 x separateness (a triplet loss that keeps the second-nearest item away).

Networks (the authors' code, `Reconstruction.py`): encoder of conv3-BN-ReLU pairs at widths
w, 2w, 4w, 8w with three max-pools (the last pair without its final BN-ReLU), w = 64; decoder
without skip connections (they would let the input through): conv pairs and stride-2 transposed
convolutions back to the input size, tanh. Images in [-1, 1] inside the model.

Score (eq. 11-12): S = 0.6 (1 - P) + 0.4 D, with P the image's PSNR and D its mean compactness
distance, each min-max normalised. The authors normalise over each test video; here the minima
and maxima are fitted on held-out normal images (`calibrate`), so an image's score is its own.
The authors' test-time memory updates (on frames scored normal) are left out for the same reason:
they would make a score depend on the test images seen before it.
Map: the per-pixel squared reconstruction error (mean over channels, [0, 1] image units).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.anomaly_map import AnomalyOutput
from anomalib_lite.models.components.interfaces import CalibratedOnNormalImages, Reconstructs, TrainableModel
from anomalib_lite.models.components.memory import MNADMemory
from anomalib_lite.schema import PositiveInt


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def _pair(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_relu(in_channels, out_channels), *_conv_bn_relu(out_channels, out_channels))


def _upsample(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 3, 2, 1, output_padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
    )


class MnadModel(TrainableModel, CalibratedOnNormalImages, Reconstructs):
    """`width`: the encoder's first width (64; the queries have 8 x width dims); `num_items`: M;
    `psnr_weight`: the score's weight of 1 - P (the paper's 0.6)."""

    def __init__(
        self,
        width: PositiveInt = 64,
        num_items: PositiveInt = 10,
        compactness_weight: float = 0.1,
        separateness_weight: float = 0.1,
        margin: float = 1.0,
        psnr_weight: float = 0.6,
        memory_seed: int = 0,
    ) -> None:
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            _pair(3, w), nn.MaxPool2d(2), _pair(w, 2 * w), nn.MaxPool2d(2), _pair(2 * w, 4 * w), nn.MaxPool2d(2),
            *_conv_bn_relu(4 * w, 8 * w), nn.Conv2d(8 * w, 8 * w, 3, padding=1),
        )
        self.memory = MNADMemory(num_items, 8 * w, margin, memory_seed)
        self.decoder = nn.Sequential(
            _pair(16 * w, 8 * w), _upsample(8 * w, 4 * w), _pair(4 * w, 4 * w), _upsample(4 * w, 2 * w),
            _pair(2 * w, 2 * w), _upsample(2 * w, w), _pair(w, w), nn.Conv2d(w, 3, 3, padding=1), nn.Tanh(),
        )
        self.weights = {"compactness": compactness_weight, "separateness": separateness_weight}
        self.psnr_weight = psnr_weight
        nan = float("nan")
        self.register_buffer("psnr_range", torch.tensor([nan, nan]))  # min, max on held-out normal images
        self.register_buffer("distance_range", torch.tensor([nan, nan]))

    def queries(self, images: torch.Tensor) -> torch.Tensor:
        """B x C x h x w unit-norm queries of images in [0, 1] (sides divisible by 8)."""
        if images.shape[-1] % 8 or images.shape[-2] % 8:
            raise UserInputError(f"MNAD's encoder pools three times: image sides must be divisible by 8, got {tuple(images.shape[-2:])}")
        return F.normalize(self.encoder(images * 2 - 1), dim=1)

    def decode(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries (B x C x h x w) -> reconstructions in [-1, 1], through the memory read."""
        batch, channels, height, width = queries.shape
        rows = self.memory.read(queries.permute(0, 2, 3, 1).reshape(-1, channels))
        return self.decoder(rows.reshape(batch, height, width, 2 * channels).permute(0, 3, 1, 2))

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return (self.decode(self.queries(images)) + 1) / 2

    @staticmethod
    def rows(queries: torch.Tensor) -> torch.Tensor:
        """B x C x h x w -> (B h w) x C, each image's positions consecutive."""
        return queries.permute(0, 2, 3, 1).reshape(-1, queries.shape[1])

    def training_terms(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(loss terms with their weighted sum "loss", the query rows for the memory update)."""
        queries = self.queries(images)
        reconstruction = self.decode(queries)
        rows = self.rows(queries)
        compactness, separateness = self.memory.losses(rows)
        terms = {"reconstruction": F.mse_loss(reconstruction, images * 2 - 1), "compactness": compactness, "separateness": separateness}
        terms["loss"] = terms["reconstruction"] + sum(self.weights[name] * terms[name] for name in self.weights)
        return terms, rows

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """The training objective without the memory update (validation)."""
        return self.training_terms(images)[0]["loss"]

    def psnr_and_distance(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(PSNR per image in dB, compactness distance per image, per-pixel squared error map)."""
        queries = self.queries(images)
        reconstruction = (self.decode(queries) + 1) / 2
        error = (reconstruction - images).pow(2)
        psnr = 10 * torch.log10(1 / error.flatten(1).mean(1).clamp_min(1e-10))
        return psnr, self.memory.distances(self.rows(queries), images.shape[0]), error.mean(dim=1)

    def calibration_maps(self, images: torch.Tensor) -> torch.Tensor:
        psnr, distance, _ = self.psnr_and_distance(images)
        return torch.stack([psnr, distance], dim=1)[:, :, None, None]

    def calibrate(self, maps: torch.Tensor) -> None:
        values = maps.flatten(2)[:, :, 0]
        self.psnr_range.copy_(torch.stack([values[:, 0].min(), values[:, 0].max()]))
        self.distance_range.copy_(torch.stack([values[:, 1].min(), values[:, 1].max()]))

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        psnr, distance, error = self.psnr_and_distance(images)
        normalised_psnr = (psnr - self.psnr_range[0]) / (self.psnr_range[1] - self.psnr_range[0]).clamp_min(1e-12)
        normalised_distance = (distance - self.distance_range[0]) / (self.distance_range[1] - self.distance_range[0]).clamp_min(1e-12)
        scores = self.psnr_weight * (1 - normalised_psnr) + (1 - self.psnr_weight) * normalised_distance
        return AnomalyOutput(scores, error)
