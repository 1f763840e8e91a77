"""DRAEM as a LightningModule: every training batch is rotated (30 %, +-90 deg) and half of it
receives Perlin-shaped texture anomalies (`PerlinSynthesizer`); the epoch kept is the one with
the best label-free validation AUPRO (held-out normal images with synthetic anomalies)."""

from __future__ import annotations

import torch

from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import SynthesisTrainedModule
from anomalib_lite.models.draem.torch_model import DraemModel


class Draem(SynthesisTrainedModule):
    """DraemModel's arguments, and the synthesis settings (`SynthesisTrainedModule`: a texture
    folder, the paper's DTD, or procedural textures; `synthesis`: the authors' code by default,
    `blend: paper` with `beta: [0.1, 1.0]` for the paper's eq. 2)."""

    model_class = DraemModel
    model: DraemModel

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        clean = self.synthesizer.rotate(batch.image)
        augmented, masks, _ = self.synthesizer(clean)
        return self.model.training_loss(clean, augmented, masks)
