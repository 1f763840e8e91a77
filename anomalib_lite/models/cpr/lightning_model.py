"""CPR as a LightningModule: before the first step, the global retrieval, the foreground
estimate and the stored training images are fitted (one pass, `CprModel.prepare`); every
training batch is then paired with retrieved training images, given synthetic anomalies (the
authors' data: Perlin regions on the foreground, texture or the image's own shuffled tiles) and
scored by the contrastive loss. The epoch kept is the one with the best label-free validation
AUPRO (the authors' code picks its checkpoint by the test set)."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import SynthesisTrainedModule
from anomalib_lite.models.cpr.torch_model import CprModel, photometric_jitter, sampling_weights

log = logging.getLogger(__name__)


class Cpr(SynthesisTrainedModule):
    """CprModel's arguments, and the synthesis settings (`SynthesisTrainedModule`: a texture
    folder, the authors' DTD, or procedural textures; `synthesis`: the authors' data generator
    by default)."""

    model_class = CprModel
    model: CprModel

    def synthesis_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        if not self.model.is_object:
            settings["structure_probability"] = 0.0  # textures: texture anomalies only (the authors' code)
        return settings

    def on_train_start(self) -> None:
        super().on_train_start()  # prepare: retrieval, foreground, stored training images
        log.info(
            "CPR: %d training images, %d retrieved per image, foreground %s",
            len(self.model.train_images), self.model.train_neighbours.shape[1],
            "estimated" if len(self.model.foreground_weight) else "not used",
        )

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        model, generator = self.model, self.synthesizer.generator
        index = batch.index.to(model.train_neighbours.device)
        if int(index.max()) >= len(model.train_images):
            raise RuntimeError("CPR's training batch indexes past the stored training images")
        size = tuple(batch.image.shape[-2:])
        choice = torch.randint(model.train_neighbours.shape[1], (len(index),), generator=generator).to(index.device)
        reference_index = model.train_neighbours[index, choice]
        references = model.train_images[reference_index].float() / 255
        weights = foreground = None
        if len(model.foreground_weight):
            upsample = lambda maps: F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]  # noqa: E731
            foreground = upsample(model.train_foreground[index])
            weights = upsample(torch.maximum(
                sampling_weights(model.train_foreground[index]), sampling_weights(model.train_foreground[reference_index])
            ).to(foreground))
        queries, masks, _ = self.synthesizer(batch.image, foreground=foreground)
        queries = photometric_jitter(queries, generator)
        references = photometric_jitter(references.to(queries), generator)
        return model.pair_loss(queries, references, masks, weights, generator)
