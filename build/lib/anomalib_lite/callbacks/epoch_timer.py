"""Wall time of each training epoch, without the validation that follows it."""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L

from anomalib_lite.callbacks.reporting import ReportingCallback


class EpochTimer(ReportingCallback):
    """Seconds per training epoch: from the epoch's start to its validation (or its end).

    Lightning runs the epoch-end validation before `on_train_epoch_end`, so the epoch is closed
    at whichever of the two comes first. Comparable across frameworks built on Lightning.
    """

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def _close(self) -> None:
        if self._start is not None:
            self.epoch_seconds.append(time.perf_counter() - self._start)
            self._start = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._close()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    @property
    def results(self) -> dict[str, float | list[float] | None]:
        """The median epoch (robust to a slow first one) and every epoch, for timing comparisons."""
        if not self.epoch_seconds:
            return {"seconds_per_epoch": None, "epoch_seconds": []}
        return {
            "seconds_per_epoch": round(statistics.median(self.epoch_seconds), 2),
            "epoch_seconds": [round(seconds, 2) for seconds in self.epoch_seconds],
        }

    def report(self) -> dict[str, Any]:
        return self.results
