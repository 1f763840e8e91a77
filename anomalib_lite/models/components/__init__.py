"""Torch building blocks shared by every method: no method owns them, every method may import them.

Plain torch (and timm, FrEIA, kornia): no Lightning here. The LightningModules methods build on
are in `anomalib_lite.engine`.
May import: `data` (image files, synthesis), `schema`, `errors`, `utils`; never the engine.
"""

import importlib
import warnings
from typing import Any

from anomalib_lite.models.components.anomaly_map import (
    AnomalyOutput,
    average_over_patches,
    blur_anomaly_map,
    smooth_anomaly_map,
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
from anomalib_lite.models.components.nearest_neighbors import batched_nearest_neighbors, nearest_neighbors
from anomalib_lite.models.components.tracing import batch_chunks, is_traced

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "AnomalyModel", "AnomalyOutput", "CalibratedOnNormalImages", "Embeddings", "FeatureExtractor", "FittedOnEmbeddings", "GreedyCoresetSampler", "ImageEncoder",
    "MemoryBankModel", "PreparedOnTrainingImages", "Reconstructs", "ResizableBuffersMixin", "TrainableModel",
    "average_over_patches", "batch_chunks", "batched_nearest_neighbors", "blur_anomaly_map", "coverage_radius", "create_backbone", "fit_position_gaussians", "greedy_coreset", "is_traced", "level_stride", "nearest_neighbors",
    "position_mahalanobis", "random_projection", "smooth_anomaly_map",
]

# Where the engine's classes were imported from before they moved (kept for users' code, loaded on use).
MOVED_TO_ENGINE = frozenset({"AnomalyModule", "MemoryBankModule", "SynthesisTrainedModule", "TrainedModule"})


def __getattr__(name: str) -> Any:
    if name in MOVED_TO_ENGINE:
        warnings.warn(
            f"anomalib_lite.models.components.{name} moved: import it from anomalib_lite.engine", DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("anomalib_lite.engine"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
