"""Datasets: MVTec AD layout, BTAD, VisA and DAGM as published, a custom folder layout, and the
built-in synthetic dataset.

The names below load on first use (PEP 562): reading images (`data.image_io`, `data.samples`)
does not import Lightning, so a deployed model's predict runs without it.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "CutBlendSynthesizer": "anomaly_synthesis",
    "Batch": "batch", "Item": "batch", "collate_items": "batch",
    "BTADDataModule": "benchmark_layouts", "DAGMDataModule": "benchmark_layouts", "VisADataModule": "benchmark_layouts",
    "AnomalyDataModule": "datamodule", "FolderDataModule": "datamodule", "MVTecDataModule": "datamodule",
    "AnomalyDataset": "samples", "Sample": "samples",
    "CATEGORIES": "synthetic", "DEFECT_TYPES": "synthetic", "SyntheticDataModule": "synthetic", "generate_category": "synthetic",
    "ValidationSet": "validation",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"anomalib_lite.data.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
