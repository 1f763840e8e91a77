"""Callbacks: coreset sampling, test metrics, heatmap export, epoch timing."""

from anomalib_lite.callbacks.coreset import CoresetSampling
from anomalib_lite.callbacks.epoch_timer import EpochTimer
from anomalib_lite.callbacks.heatmaps import HeatmapExport, render_heatmap
from anomalib_lite.callbacks.metrics import AnomalyMetrics, compute_metrics

__all__ = ["AnomalyMetrics", "CoresetSampling", "EpochTimer", "HeatmapExport", "compute_metrics", "render_heatmap"]
