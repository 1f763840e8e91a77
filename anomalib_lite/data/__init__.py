"""Datasets: MVTec AD layout, BTAD, VisA and DAGM as published, a custom folder layout, and the
built-in synthetic dataset."""

from anomalib_lite.data.anomaly_synthesis import CutBlendSynthesizer
from anomalib_lite.data.batch import Batch, Item, collate_items
from anomalib_lite.data.benchmark_layouts import BTADDataModule, DAGMDataModule, VisADataModule
from anomalib_lite.data.datamodule import AnomalyDataModule, FolderDataModule, MVTecDataModule
from anomalib_lite.data.samples import AnomalyDataset, Sample
from anomalib_lite.data.synthetic import CATEGORIES, DEFECT_TYPES, SyntheticDataModule, generate_category
from anomalib_lite.data.validation import ValidationSet

__all__ = [
    "AnomalyDataModule", "AnomalyDataset", "BTADDataModule", "Batch", "DAGMDataModule", "CATEGORIES", "CutBlendSynthesizer", "DEFECT_TYPES",
    "FolderDataModule", "Item", "MVTecDataModule", "Sample", "SyntheticDataModule", "ValidationSet", "VisADataModule",
    "collate_items", "generate_category",
]
