"""Progress: Lightning's bar on a terminal, plain timed lines anywhere else (logs, CI, SLURM files)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger(__name__)


class Progress(TQDMProgressBar):
    """`mode`: "bar" (tqdm), "lines" (a log line every `interval` seconds and at the end of each
    stage, with the epoch's mean training loss), or "auto": a bar when stdout is a terminal.

    A bar written to a file is a stream of carriage returns and escape codes; lines read well there.
    """

    def __init__(self, refresh_rate: int = 1, mode: str = "auto", interval: float = 30.0) -> None:
        super().__init__(refresh_rate=refresh_rate)
        if mode not in ("auto", "bar", "lines"):
            raise ValueError(f"callbacks.progress.mode must be auto, bar or lines, got {mode}")
        self.lines = mode == "lines" or (mode == "auto" and not sys.stdout.isatty())
        self.interval = interval
        self._last = 0.0
        self._stage_start = 0.0
        self._done, self._total = 0, None  # batches of the current stage: done, and in all
        if self.lines:
            self.disable()

    # -- lines ---------------------------------------------------------------------------------
    def _start(self) -> None:
        self._stage_start = self._last = time.perf_counter()
        self._done = 0

    def _maybe_report(self, what: str, done: int, total: Any, force: bool = False, extra: str = "") -> None:
        self._done, self._total = done, total
        now = time.perf_counter()
        if not self.lines or (not force and now - self._last < self.interval):
            return
        self._last = now
        of = f"/{int(total)}" if isinstance(total, (int, float)) and total != float("inf") else ""
        log.info("%s: %d%s batches, %.0f s%s", what, done, of, now - self._stage_start, extra)

    def _loss_text(self, trainer: L.Trainer) -> str:
        loss = trainer.callback_metrics.get("train_loss_epoch", trainer.callback_metrics.get("train_loss"))
        return f", train loss {float(loss):.4g}" if loss is not None else ""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._start()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        epoch = f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        self._maybe_report(epoch, batch_idx + 1, self.total_train_batches)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        epoch = f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        self._maybe_report(epoch, self._done, self.total_train_batches, force=True, extra=self._loss_text(trainer))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        if trainer.state.fn != "fit":
            self._start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:  # noqa: ANN001
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if trainer.state.fn != "fit":
            self._done, self._total = batch_idx + 1, self.total_val_batches_current_dataloader

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn != "fit":
            self._maybe_report("validation", self._done, self._total, force=True)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self._start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:  # noqa: ANN001
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._maybe_report("test", batch_idx + 1, self.total_test_batches_current_dataloader)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_test_end(trainer, pl_module)
        self._maybe_report("test", self._done, self._total, force=True)
