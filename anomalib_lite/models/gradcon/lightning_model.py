"""GradCon as a LightningModule: the framework's loop on MSE + beta x L_grad; after every backward
pass (DDP has averaged the gradients by then) the decoder's gradients join their running averages."""

from __future__ import annotations

import torch

from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.gradcon.torch_model import GradConModel


class GradCon(TrainedModule):
    """GradConModel's arguments and the training settings (the authors: Adam 1e-3, batch 64)."""

    model_class = GradConModel
    model: GradConModel

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.model.training_terms(batch.image)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        gradients = [weight.grad for weight in self.model.decoder_weights()]
        if all(gradient is not None for gradient in gradients):
            self.model.update_references(gradients)
