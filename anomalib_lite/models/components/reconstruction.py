"""Scoring by reconstruction: what a model cannot reproduce of an image is anomalous.

`ReconstructionModel` is the base of the autoencoder family (AE, DAE, VAE, MemAE, ...): a
subclass says how it reconstructs; the map is the per-pixel reconstruction error (squared error
averaged over the channels, or 1 - SSIM as in Bergmann et al.'s SSIM autoencoder) and the image
score its maximum or mean.
"""

from __future__ import annotations

from abc import abstractmethod

import kornia
import torch

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.anomaly_map import AnomalyOutput, blur_anomaly_map
from anomalib_lite.models.components.autoencoders import ConvAutoencoder, square_side
from anomalib_lite.models.components.interfaces import Reconstructs, TrainableModel
from anomalib_lite.schema import PositiveInt, Size

ERRORS = ("l2", "ssim")
REDUCTIONS = ("max", "mean")


def reconstruction_error_map(
    images: torch.Tensor, reconstructions: torch.Tensor, error: str = "l2", ssim_window: int = 11
) -> torch.Tensor:
    """B x H x W: squared error averaged over channels ("l2"), or 1 - SSIM averaged over channels
    ("ssim": Gaussian window of `ssim_window`, sigma 1.5, data range 1)."""
    if error == "l2":
        return (images - reconstructions).pow(2).mean(dim=1)
    if error == "ssim":
        return 1 - kornia.metrics.ssim(images, reconstructions, ssim_window, max_val=1.0).mean(dim=1)
    raise UserInputError(f"the reconstruction error must be one of {ERRORS}, got {error}")


def reconstruction_loss(
    images: torch.Tensor, reconstructions: torch.Tensor, error: str = "l2", ssim_window: int = 11
) -> torch.Tensor:
    """The mean of `reconstruction_error_map`: MSE for "l2", 1 - mean SSIM for "ssim"."""
    return reconstruction_error_map(images, reconstructions, error, ssim_window).mean()


def reduce_map(anomaly_map: torch.Tensor, reduction: str = "max") -> torch.Tensor:
    """Image scores (B) from maps (B x H x W): their maximum or mean."""
    if reduction == "max":
        return anomaly_map.flatten(1).amax(dim=1)
    if reduction == "mean":
        return anomaly_map.flatten(1).mean(dim=1)
    raise UserInputError(f"the image score must be one of {REDUCTIONS} of the map, got {reduction}")


class ReconstructionModel(TrainableModel, Reconstructs):
    """A trained model scored by its reconstruction error.

    `error`: "l2" or "ssim" (the map, and the training loss unless a subclass defines its own);
    `score`: "max" or "mean" of the map; `map_sigma`: a Gaussian blur of the map (0: none) before
    the image score is taken, as the reference implementations smooth residual maps.
    """

    def __init__(self, error: str = "l2", score: str = "max", ssim_window: int = 11, map_sigma: float = 0.0) -> None:
        super().__init__()
        if error not in ERRORS:
            raise UserInputError(f"method.error must be one of {ERRORS}, got {error}")
        if score not in REDUCTIONS:
            raise UserInputError(f"method.score must be one of {REDUCTIONS}, got {score}")
        self.error, self.score, self.ssim_window, self.map_sigma = error, score, ssim_window, map_sigma

    @abstractmethod
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W images in [0, 1] -> their reconstructions (eval mode: deterministic)."""

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(images, self.reconstruct(images), self.error, self.ssim_window)

    def anomaly_map(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        return blur_anomaly_map(reconstruction_error_map(images, reconstructions, self.error, self.ssim_window), self.map_sigma)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        anomaly_map = self.anomaly_map(images, self.reconstruct(images))
        return AnomalyOutput(reduce_map(anomaly_map, self.score), anomaly_map)


class ConvAutoencoderModel(ReconstructionModel):
    """The convolutional autoencoder of `components.autoencoders` scored by its reconstruction error
    (the plain AE and the denoising AE differ only in what they train on).

    `image_size`: the square input side; `depth` halvings to a b x b bottom (b = side / 2^depth),
    then a `latent_channels` vector (`flat`) or map; `width`: channels of the first convolution.
    """

    def __init__(
        self,
        image_size: Size,
        latent_channels: PositiveInt = 100,
        width: PositiveInt = 32,
        depth: PositiveInt = 4,
        flat: bool = True,
        error: str = "l2",
        score: str = "max",
        ssim_window: PositiveInt = 11,
        map_sigma: float = 0.0,
    ) -> None:
        super().__init__(error, score, ssim_window, map_sigma)
        self.autoencoder = ConvAutoencoder(square_side(image_size), latent_channels, 3, width, depth, flat)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder(images)
