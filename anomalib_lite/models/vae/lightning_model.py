"""The VAE as a LightningModule, with the PaDiM paper's training augmentation.

The paper: rotation by U(-2, 2) degrees, resize to 292, random crop of 282, centre crop of 256,
against test images resized to 256 and centre-cropped to 224 (the paper's protocol). Both frame
the object at the same zoom (292 / 256 = 1.14 = 256 / 224): what the augmentation adds is the
rotation and a random shift of up to +-5 px at 292 (the 282 crop's slack). Here every image,
training or test, already has the datamodule's framing, so the augmentation is that rotation and
shift alone (reflection fills the few border pixels they uncover). Zooming again on top of the
datamodule's framing (this module's first version) trains on a scale the test never shows.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch

from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.vae.torch_model import VaeModel


class Vae(TrainedModule):
    """VaeModel's arguments; `augment`: the paper's training augmentation (false: none)."""

    model_class = VaeModel
    model: VaeModel

    def __init__(self, augment: bool = True, rotation_degrees: float = 2.0, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.augment = augment
        self.rotation_degrees = rotation_degrees

    def augmentation(self) -> K.RandomAffine:
        """Rotation U(-r, r) degrees and a shift of up to 5 / 292 of the side (the paper's crop slack)."""
        shift = (292 - 282) / 2 / 292
        return K.RandomAffine(self.rotation_degrees, translate=(shift, shift), padding_mode="reflection", p=1.0)

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        images = batch.image
        if self.augment:
            images = self.augmentation()(images).clamp(0, 1)
        return self.model.elbo_terms(images)
