"""The seam between the engine's own passes over the data and the run's progress display."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class PassTracker(ABC):
    """A progress display that can show a pass outside Lightning's loops (statistics over the
    training images, calibration, embedding): `callbacks.Progress` is one."""

    @abstractmethod
    def track(self, batches: Iterable[T], what: str) -> Iterator[T]:
        """Yield `batches`, showing the pass under the name `what`."""
