"""Pieces shared by every method: no method owns them, every method may import them."""

from anomalib_lite.models.components.anomaly_map import AnomalyOutput, smooth_anomaly_map
from anomalib_lite.models.components.anomaly_module import AnomalyModule, MemoryBankModule, TrainedModule
from anomalib_lite.models.components.buffers import ResizableBuffersMixin
from anomalib_lite.models.components.coreset import coverage_radius, greedy_coreset, random_projection
from anomalib_lite.models.components.feature_extractor import FeatureExtractor, create_backbone, level_stride
from anomalib_lite.models.components.nearest_neighbors import nearest_neighbors

__all__ = [
    "AnomalyModule", "AnomalyOutput", "FeatureExtractor", "MemoryBankModule", "ResizableBuffersMixin",
    "coverage_radius", "create_backbone", "greedy_coreset", "level_stride", "nearest_neighbors",
    "random_projection", "smooth_anomaly_map", "TrainedModule",
]
