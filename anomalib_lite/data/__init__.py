"""Datasets: MVTec AD layout, a custom folder layout, and the built-in synthetic dataset."""

from anomalib_lite.data.anomaly_synthesis import CutBlendSynthesizer
from anomalib_lite.data.datamodule import AnomalyDataModule, FolderDataModule, MVTecDataModule
from anomalib_lite.data.samples import AnomalyDataset, Sample
from anomalib_lite.data.synthetic import CATEGORIES, DEFECT_TYPES, SyntheticDataModule, generate_category

__all__ = [
    "AnomalyDataModule", "AnomalyDataset", "CATEGORIES", "CutBlendSynthesizer", "DEFECT_TYPES", "FolderDataModule",
    "MVTecDataModule", "Sample", "SyntheticDataModule", "generate_category",
]
