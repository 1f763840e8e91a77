"""CFLOW-AD as a LightningModule: one optimiser step per random batch of fibers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.cflow.torch_model import CflowModel


class Cflow(TrainedModule):
    """Training as in the authors' code: per image batch and level, the B*h*w fibers are shuffled
    and cut into batches of `fiber_batch_size`; each fiber batch is one optimiser step on that
    level's flow. The config's optimiser ("flows") is built once per level: a fiber step updates
    only the flow it trained (the same updates as the authors' single Adam over all flows, whose
    per-parameter state only moves for parameters with gradients). A scheduler steps once per
    image batch (`interval: step`) or per epoch.

    The other arguments are CflowModel's (levels, condition_dim, coupling_blocks, clamp, permute_soft).
    """

    model_class = CflowModel
    model: CflowModel
    ddp_find_unused_parameters = True  # each fiber step uses one level's flow

    def __init__(self, fiber_batch_size: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fiber_batch_size = fiber_batch_size
        self.automatic_optimization = False  # many optimiser steps per image batch
        self._epoch_max_likelihood: torch.Tensor | None = None

    def parameter_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        return {"flows": self.model.decoders.parameters()}

    def configure_optimizers(self) -> list[dict[str, Any]]:
        self._optimizer_names = [f"flows/{level}" for level in range(len(self.model.decoders))]
        configured = []
        for decoder in self.model.decoders:
            optimizer = self.build_optimizer("flows", decoder.parameters())
            scheduler = self.build_scheduler("flows", optimizer)
            configured.append({"optimizer": optimizer} | ({"lr_scheduler": scheduler} if scheduler else {}))
        return configured

    def on_train_epoch_start(self) -> None:
        self._epoch_max_likelihood = torch.full_like(self.model.likelihood_offset, -torch.inf)

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        total, count = batch.image.new_zeros(()), 0
        for level, (features, conditions, _) in enumerate(self.model.fibers(batch.image)):
            optimizer = self.optimizer(f"flows/{level}")
            order = torch.randperm(len(features), device=features.device)
            for start in range(0, len(order), self.fiber_batch_size):
                index = order[start : start + self.fiber_batch_size]
                log_likelihood = self.model.log_likelihood_per_dim(level, features[index], conditions[index])
                loss = -F.logsigmoid(log_likelihood).mean()
                self.step(optimizer, loss)
                total += loss.detach() * len(index)  # a tensor: no host sync per fiber step
                count += len(index)
                self._epoch_max_likelihood[level] = torch.maximum(
                    self._epoch_max_likelihood[level], log_likelihood.detach().max()
                )
        self.step_schedulers("step")
        # The likelihood scale of the current weights, so validation maps use this epoch's offsets.
        self.model.likelihood_offset.copy_(self._synced_max(self._epoch_max_likelihood))
        self.log("train_loss", total / count, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch))

    def _synced_max(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise max over DDP ranks (every rank must use the same offsets)."""
        gathered = self.all_gather(values)
        return gathered.amax(dim=0) if gathered.ndim > values.ndim else gathered
