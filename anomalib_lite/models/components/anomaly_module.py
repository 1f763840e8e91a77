"""Base LightningModules shared by every method.

`AnomalyModule` owns what is the same for all methods: validation on held-out *normal* images
fits the image/pixel thresholds and the heatmap colour scale (stored as buffers, so they travel
in the checkpoint), and test steps hand one `AnomalyOutput` per batch to the callbacks.
`MemoryBankModule` adds the one-pass fitting of memory-bank methods (PatchCore, PaDiM);
`TrainedModule` the optimiser loop of trained methods (the flows), with the best epoch chosen by
a validation loss on held-out normal images (no test label involved).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import nn

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.anomaly_map import AnomalyOutput
from anomalib_lite.utils.distributed import gather_samples


class AnomalyModule(L.LightningModule):
    model: nn.Module
    # Trainer settings a method needs whatever the trainer config says (merged over it).
    trainer_arguments: dict[str, Any] = {}
    shuffle_train: bool = True

    def __init__(self) -> None:
        super().__init__()
        nan = float("nan")
        self.register_buffer("image_threshold", torch.tensor(nan))
        self.register_buffer("pixel_threshold", torch.tensor(nan))
        self.register_buffer("pixel_floor", torch.tensor(nan))
        self._val_scores: list[torch.Tensor] = []
        self._val_maps: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        return self.model(images)

    # -- validation: thresholds and colour scale from normal images only -----------------------
    def on_validation_epoch_start(self) -> None:
        self._val_scores, self._val_maps, self._val_index = [], [], []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        output = self.model(batch["image"])
        self._val_scores.append(output.pred_score.detach().cpu())
        self._val_maps.append(output.anomaly_map.detach().cpu())
        self._val_index.append(batch["index"].cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_index:
            return
        gathered = gather_samples(
            self, {"score": torch.cat(self._val_scores), "map": torch.cat(self._val_maps)}, torch.cat(self._val_index)
        )
        self.fit_thresholds(gathered["score"], gathered["map"])
        self._val_scores, self._val_maps, self._val_index = [], [], []

    @torch.no_grad()
    def fit_thresholds(self, normal_scores: torch.Tensor, normal_maps: torch.Tensor) -> None:
        """Thresholds = the largest score seen on held-out normal data (no false positive there).

        The colour scale maps the median normal pixel to 0 and the pixel threshold to 0.5.
        """
        self.image_threshold.fill_(float(normal_scores.max()))
        self.pixel_threshold.fill_(float(normal_maps.max()))
        self.pixel_floor.fill_(float(normal_maps.flatten().median()))

    def normalize_anomaly_map(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Map scores onto [0, 1] with the validation-fitted scale (same for every test image)."""
        if torch.isnan(self.pixel_threshold):
            raise RuntimeError("normalisation is not fitted: run validation before test")
        span = (self.pixel_threshold - self.pixel_floor).clamp_min(1e-12)
        return ((anomaly_map - self.pixel_floor) / span * 0.5).clamp(0, 1)

    # -- test: one AnomalyOutput per batch, consumed by the callbacks ----------------------------
    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        output = self.model(batch["image"])
        return {"pred_score": output.pred_score, "anomaly_map": output.anomaly_map}

    def predict_step(self, batch: dict, batch_idx: int) -> AnomalyOutput:
        return self.model(batch["image"])


class MemoryBankModule(AnomalyModule):
    """One pass over the normal images, no optimizer; the torch model is fitted at epoch end.

    Training steps collect the model's per-image embeddings with their dataset indices; at the end
    of the epoch they are gathered from every DDP rank in dataset order, so the fitted statistics
    (or memory bank) are the same as a single process would build.
    """

    # max_epochs=1: a single pass. check_val_every_n_epoch=2 > max_epochs: no validation inside
    # fit, because the model only exists once the epoch has ended; `trainer.validate` follows fit.
    trainer_arguments = {"max_epochs": 1, "num_sanity_val_steps": 0, "check_val_every_n_epoch": 2}
    shuffle_train = False

    def __init__(self) -> None:
        super().__init__()
        # Nothing to optimise: manual mode runs training_step as a plain loop body (also under DDP).
        self.automatic_optimization = False
        self._train_embeddings: list[torch.Tensor] = []
        self._train_index: list[torch.Tensor] = []

    def configure_optimizers(self) -> None:
        return None

    def on_train_epoch_start(self) -> None:
        self._train_embeddings, self._train_index = [], []

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self._train_embeddings.append(self.model.embed(batch["image"]))
        self._train_index.append(batch["index"].to(self.device))

    def on_train_epoch_end(self) -> None:
        gathered = gather_samples(
            self, {"embedding": torch.cat(self._train_embeddings)}, torch.cat(self._train_index)
        )
        self._train_embeddings, self._train_index = [], []
        self.model.fit(gathered["embedding"])


class TrainedModule(AnomalyModule):
    """Methods fitted by gradient descent for `epochs` epochs on normal images.

    The torch model provides `loss(images) -> scalar` (the training objective on a batch, also
    evaluated on the held-out normal validation images after every epoch as `val_loss`).
    The run keeps the weights of the epoch with the lowest `val_loss` (a Lightning
    `ModelCheckpoint`, see `checkpoint_monitor`) and tests those, not the last epoch's.
    Subclasses with another objective override `training_step`.
    """

    checkpoint_monitor = "val_loss"  # lower is better

    def __init__(self, epochs: int, learning_rate: float, weight_decay: float = 0.0) -> None:
        super().__init__()
        if epochs < 1:
            raise UserInputError(f"method.epochs must be at least 1, got {epochs}")
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay

    @property
    def trainer_arguments(self) -> dict[str, Any]:  # type: ignore[override]
        # Validation after every epoch: it both scores the epoch and refits the thresholds.
        return {
            "max_epochs": self.epochs, "num_sanity_val_steps": 0, "check_val_every_n_epoch": 1,
            "enable_checkpointing": True,  # the run adds the best-epoch ModelCheckpoint
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.adam(p for p in self.parameters() if p.requires_grad)

    def adam(self, parameters: Iterable[nn.Parameter]) -> torch.optim.Adam:
        """Adam with the method's learning rate and weight decay.

        The fused kernel (one op per step instead of ~10 per tensor) where torch has it: same
        update rule, and on CPU it removed ~20 % of a CFLOW fiber step (small batches, many steps).
        """
        parameters = list(parameters)
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters)
        return torch.optim.Adam(
            parameters, lr=self.learning_rate, weight_decay=self.weight_decay, fused=fused or None
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(batch["image"])
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        loss = self.model.loss(batch["image"])
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=len(batch["image"]))
