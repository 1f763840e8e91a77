"""MNAD as a LightningModule: the framework's loop on the MNAD loss, and after each training step's
forward the memory update on the step's queries (gathered from every DDP rank, so every rank's
memory stays the one a single process would hold for the whole batch)."""

from __future__ import annotations

import torch

from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.mnad.torch_model import MnadModel


class Mnad(TrainedModule):
    """MnadModel's arguments and the training settings."""

    model_class = MnadModel
    model: MnadModel

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        terms, rows = self.model.training_terms(batch.image)
        rows = rows.detach()
        if self.trainer.world_size > 1:
            rows = self.all_gather(rows).flatten(0, 1)
        # The loss above used the memory as it was; no backward pass goes through the items.
        self.model.memory.update(rows)
        return terms
