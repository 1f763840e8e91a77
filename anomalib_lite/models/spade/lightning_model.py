"""SPADE as a LightningModule: one pass stores the training images' features; nothing is trained."""

from __future__ import annotations

import logging

from anomalib_lite.engine import MemoryBankModule
from anomalib_lite.models.components import Embeddings
from anomalib_lite.models.spade.torch_model import SpadeModel

log = logging.getLogger(__name__)


class Spade(MemoryBankModule):
    """The arguments are SpadeModel's (levels, global_level, num_neighbors, num_pixel_neighbors,
    pyramid_matching, blur_sigma)."""

    model_class = SpadeModel
    model: SpadeModel

    def fit_model(self, embeddings: Embeddings) -> None:
        num_images = embeddings["global"].shape[0]
        if num_images < self.model.num_neighbors:
            log.info(
                "SPADE: %d fitted images, fewer than method.num_neighbors=%d: every image is retrieved",
                num_images, self.model.num_neighbors,
            )
        super().fit_model(embeddings)
