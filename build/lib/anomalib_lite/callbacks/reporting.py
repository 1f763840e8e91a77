"""The interface through which callbacks contribute to a run's metrics.json."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from lightning.pytorch.callbacks import Callback


class ReportingCallback(Callback, ABC):
    """A callback whose results belong in metrics.json: the run merges every `report()`."""

    @abstractmethod
    def report(self) -> dict[str, Any]:
        """Flat, JSON-serialisable results of the last run (test metrics, timings, paths)."""
