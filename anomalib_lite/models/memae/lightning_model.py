"""MemAE as a LightningModule: the framework's training loop on MSE + addressing entropy."""

from __future__ import annotations

import torch

from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.memae.torch_model import MemAEModel


class MemAE(TrainedModule):
    """MemAEModel's arguments and the training settings."""

    model_class = MemAEModel
    model: MemAEModel

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.model.loss_terms(batch.image)
