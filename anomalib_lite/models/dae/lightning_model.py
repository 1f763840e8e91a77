"""The denoising autoencoder as a LightningModule: every training batch is corrupted (Gaussian
noise, and optionally the project's synthetic anomalies) and reconstructed towards the clean batch."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch

from anomalib_lite.data.anomaly_synthesis import PerlinSynthesizer
from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import TrainedModule
from anomalib_lite.errors import UserInputError
from anomalib_lite.models.dae.torch_model import DenoisingAutoencoderModel
from anomalib_lite.schema import NonNegative

log = logging.getLogger(__name__)


class DenoisingAutoencoder(TrainedModule):
    """DenoisingAutoencoderModel's arguments and the corruption:

    - `noise_std`: additive Gaussian noise N(0, std^2) per pixel, clipped to [0, 1] (0: none);
    - `synthetic_anomalies`: also paste Perlin-shaped texture regions (`PerlinSynthesizer`, as
      DRAEM's, without its image rotation) filled from `anomaly_source` (a folder of images, or
      null for the package's procedural textures); `synthesis`: the synthesiser's other arguments.
    The validation loss is the reconstruction of clean held-out images (nothing to denoise).
    """

    model_class = DenoisingAutoencoderModel
    model: DenoisingAutoencoderModel

    def __init__(
        self,
        noise_std: Annotated[float, NonNegative] = 0.1,
        synthetic_anomalies: bool = False,
        anomaly_source: str | None = None,
        synthesis: Mapping[str, Any] | None = None,
        corruption_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if noise_std == 0 and not synthetic_anomalies:
            raise UserInputError("a denoising autoencoder needs a corruption: method.noise_std > 0 or method.synthetic_anomalies=true")
        super().__init__(**kwargs)
        self.noise_std = noise_std
        self.corruption_seed = corruption_seed
        self.generator = torch.Generator().manual_seed(corruption_seed)
        source = str(Path(anomaly_source).expanduser()) if anomaly_source else None
        self.synthesizer = PerlinSynthesizer(source, **(synthesis or {}), seed=corruption_seed) if synthetic_anomalies else None

    def on_fit_start(self) -> None:
        # Each DDP rank draws its own corruption, reproducibly.
        self.generator.manual_seed(self.corruption_seed + self.global_rank)
        if self.synthesizer is not None:
            self.synthesizer.reseed(self.corruption_seed + self.global_rank)
            log.info("DAE corruption: Perlin-shaped regions filled with %s", self.synthesizer.source.describe())

    def corrupt(self, images: torch.Tensor) -> torch.Tensor:
        """Synthetic anomalies (if enabled), then Gaussian noise, clipped to [0, 1]."""
        if self.synthesizer is not None:
            images = self.synthesizer(images).images
        if self.noise_std > 0:
            noise = torch.randn(images.shape, generator=self.generator).to(images)
            images = (images + self.noise_std * noise).clamp(0, 1)
        return images

    def training_loss(self, batch: Batch) -> torch.Tensor:
        return self.model.denoising_loss(self.corrupt(batch.image), batch.image)
