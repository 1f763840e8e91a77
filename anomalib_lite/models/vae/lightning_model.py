"""The VAE as a LightningModule, with the PaDiM paper's training augmentation: at 256 px, rotation
by U(-2, 2) degrees, resize to 292, random crop of 282, centre crop of 256 (scaled with the
input side for other sizes)."""

from __future__ import annotations

import kornia.augmentation as K
import torch

from anomalib_lite.data.batch import Batch
from anomalib_lite.models.components import TrainedModule
from anomalib_lite.models.vae.torch_model import VaeModel


class Vae(TrainedModule):
    """VaeModel's arguments; `augment`: the paper's training augmentation (false: none)."""

    model_class = VaeModel
    model: VaeModel

    def __init__(self, augment: bool = True, rotation_degrees: float = 2.0, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.augment = augment
        self.rotation_degrees = rotation_degrees

    def augmentation(self, side: int) -> K.AugmentationSequential:
        resized, cropped = round(side * 292 / 256), round(side * 282 / 256)
        return K.AugmentationSequential(
            K.RandomRotation(self.rotation_degrees, p=1.0), K.Resize((resized, resized)),
            K.RandomCrop((cropped, cropped)), K.CenterCrop((side, side)),
        )

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        images = batch.image
        if self.augment:
            images = self.augmentation(images.shape[-1])(images).clamp(0, 1)
        return self.model.elbo_terms(images)
