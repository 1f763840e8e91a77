"""CFLOW-AD as a LightningModule: one optimiser step per random batch of fibers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from anomalib_lite.models.cflow.torch_model import CflowModel
from anomalib_lite.models.components import TrainedModule


class Cflow(TrainedModule):
    """Training as in the paper: per image batch and level, the B*h*w fibers are shuffled and
    cut into batches of `fiber_batch_size`; each fiber batch is one Adam step on that level's flow.

    `model_args` are CflowModel's (levels, condition_dim, coupling_blocks, clamp, permute_soft).
    One Adam per level's flow: a fiber step updates only the flow it trained.
    """

    ddp_find_unused_parameters = True  # each fiber step uses one level's flow

    def __init__(
        self,
        backbone: dict,
        epochs: int = 10,
        learning_rate: float = 1e-4,
        fiber_batch_size: int = 64,
        **model_args: Any,
    ) -> None:
        super().__init__(epochs=epochs, learning_rate=learning_rate)
        self.save_hyperparameters()
        self.fiber_batch_size = fiber_batch_size
        self.automatic_optimization = False  # many optimiser steps per image batch
        self.model = CflowModel(backbone=dict(backbone), **model_args)
        self._epoch_max_likelihood: torch.Tensor | None = None

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.adam(decoder.parameters()) for decoder in self.model.decoders]

    def on_train_epoch_start(self) -> None:
        self._epoch_max_likelihood = torch.full_like(self.model.likelihood_offset, -torch.inf)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        optimizers = self.optimizers()
        total, count = batch["image"].new_zeros(()), 0
        for level, (features, conditions, _) in enumerate(self.model.fibers(batch["image"])):
            optimizer = optimizers[level]
            order = torch.randperm(len(features), device=features.device)
            for start in range(0, len(order), self.fiber_batch_size):
                index = order[start : start + self.fiber_batch_size]
                log_likelihood = self.model.log_likelihood_per_dim(level, features[index], conditions[index])
                loss = -F.logsigmoid(log_likelihood).mean()
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
                total += loss.detach() * len(index)  # a tensor: no host sync per fiber step
                count += len(index)
                self._epoch_max_likelihood[level] = torch.maximum(
                    self._epoch_max_likelihood[level], log_likelihood.detach().max()
                )
        # The likelihood scale of the current weights, so validation maps use this epoch's offsets.
        self.model.likelihood_offset.copy_(self._synced_max(self._epoch_max_likelihood))
        self.log("train_loss", total / count, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["image"]))

    def _synced_max(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise max over DDP ranks (every rank must use the same offsets)."""
        gathered = self.all_gather(values)
        return gathered.amax(dim=0) if gathered.ndim > values.ndim else gathered
