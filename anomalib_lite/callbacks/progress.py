"""Progress: Lightning's bar on a terminal, plain timed lines anywhere else (logs, CI, SLURM files)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm.auto import tqdm

from anomalib_lite.engine.progress import PassTracker

log = logging.getLogger(__name__)
T = TypeVar("T")


class Progress(TQDMProgressBar, PassTracker):
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

    def _maybe_report(
        self, what: str, done: int, total: Any, force: bool = False, extra: str = "", start: float | None = None,
    ) -> bool:
        """Log a line if `interval` has passed since the last one (or `force`); True when it did."""
        self._done, self._total = done, total
        now = time.perf_counter()
        if not self.lines or (not force and now - self._last < self.interval):
            return False
        self._last = now
        of = f"/{int(total)}" if isinstance(total, (int, float)) and total != float("inf") else ""
        log.info("%s: %d%s batches, %.0f s%s", what, done, of, now - (self._stage_start if start is None else start), extra)
        return True

    def track(self, batches: Iterable[T], what: str) -> Iterator[T]:
        """Progress of a pass outside Lightning's loops (statistics over the training images,
        calibration, embedding): a bar, or timed lines closed by one when any was written (short
        passes stay quiet)."""
        total = len(batches) if isinstance(batches, Sized) else None
        if not self.lines:
            yield from tqdm(batches, desc=what, total=total, leave=False, disable=self.is_disabled, file=sys.stdout)
            return
        stage = self._done, self._total  # a pass may run inside a stage: leave the stage's count as it was
        start, reported, done = time.perf_counter(), False, 0
        for done, batch in enumerate(batches, 1):
            yield batch
            if done != total:
                reported |= self._maybe_report(what, done, total, start=start)
        self._done, self._total = stage
        if reported:
            log.info("%s: %d batches in %.0f s", what, done, time.perf_counter() - start)

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
