"""Pieces shared by every method: no method owns them, every method may import them."""

from anomalib_lite.models.components.anomaly_map import (
    AnomalyOutput,
    average_over_patches,
    blur_anomaly_map,
    smooth_anomaly_map,
)
from anomalib_lite.models.components.anomaly_module import (
    AnomalyModule,
    MemoryBankModule,
    SynthesisTrainedModule,
    TrainedModule,
)
from anomalib_lite.models.components.buffers import ResizableBuffersMixin
from anomalib_lite.models.components.coreset import (
    GreedyCoresetSampler,
    coverage_radius,
    greedy_coreset,
    random_projection,
)
from anomalib_lite.models.components.feature_extractor import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureExtractor,
    ImageEncoder,
    create_backbone,
    level_stride,
)
from anomalib_lite.models.components.gaussian import fit_position_gaussians, position_mahalanobis
from anomalib_lite.models.components.interfaces import (
    AnomalyModel,
    CalibratedOnNormalImages,
    Embeddings,
    FittedOnEmbeddings,
    MemoryBankModel,
    PreparedOnTrainingImages,
    Reconstructs,
    TrainableModel,
)
from anomalib_lite.models.components.nearest_neighbors import nearest_neighbors

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "AnomalyModel", "AnomalyModule", "AnomalyOutput", "CalibratedOnNormalImages", "Embeddings", "FeatureExtractor", "FittedOnEmbeddings", "GreedyCoresetSampler", "ImageEncoder",
    "MemoryBankModel", "MemoryBankModule", "PreparedOnTrainingImages", "Reconstructs", "ResizableBuffersMixin", "SynthesisTrainedModule", "TrainableModel", "TrainedModule",
    "average_over_patches", "blur_anomaly_map", "coverage_radius", "create_backbone", "fit_position_gaussians", "greedy_coreset", "level_stride", "nearest_neighbors",
    "position_mahalanobis", "random_projection", "smooth_anomaly_map",
]
