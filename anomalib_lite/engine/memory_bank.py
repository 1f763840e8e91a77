"""The base of memory-bank methods (PatchCore, PaDiM, SPADE, ...): fitted in one pass, no optimiser."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from anomalib_lite.data.batch import Batch
from anomalib_lite.engine.module import AnomalyModule, gather_rows
from anomalib_lite.models.components.interfaces import Embeddings, MemoryBankModel


class MemoryBankModule(AnomalyModule):
    """One pass over the normal images, no optimizer; the torch model is fitted at epoch end.

    Training steps collect the model's per-image embeddings with their dataset indices; at the end
    of the epoch they are gathered from every DDP rank in dataset order, so the fitted statistics
    (or memory bank) are the same as a single process would build.
    """

    model_class: type[MemoryBankModel]
    model: MemoryBankModel
    train_shuffle = False

    def __init__(self, backbone: Mapping[str, Any] | None = None, **model_args: Any) -> None:
        super().__init__(backbone, **model_args)
        self.save_hyperparameters()
        # Nothing to optimise: manual mode runs training_step as a plain loop body (also under DDP).
        self.automatic_optimization = False
        self._train_embeddings: list[Embeddings] = []
        self._train_index: list[torch.Tensor] = []

    def trainer_settings(self, requested: Mapping[str, Any]) -> dict[str, Any]:
        # A single pass. check_val_every_n_epoch=2 > max_epochs: no validation inside fit, because
        # the model only exists once the epoch has ended; the run validates after fit.
        return {"max_epochs": 1, "num_sanity_val_steps": 0, "check_val_every_n_epoch": 2}

    def configure_optimizers(self) -> None:
        return None

    def on_train_epoch_start(self) -> None:
        self._train_embeddings, self._train_index = [], []

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        self._train_embeddings.append(self.model.embed(batch.image))
        self._train_index.append(batch.index.to(self.device))

    def on_train_epoch_end(self) -> None:
        rows, index = self._train_embeddings, torch.cat(self._train_index)
        self._train_embeddings, self._train_index = [], []
        self.fit_model(gather_rows(self, rows, index))

    def fit_model(self, embeddings: Embeddings) -> None:
        """Fit the torch model on every training image's embedding (every rank holds all of them)."""
        self.model.fit(embeddings)
