"""Callbacks: test metrics, heatmap export, epoch timing, progress; each reports into metrics.json."""

from anomalib_lite.callbacks.epoch_timer import EpochTimer
from anomalib_lite.callbacks.heatmaps import HeatmapExport
from anomalib_lite.callbacks.metrics import AnomalyMetrics
from anomalib_lite.callbacks.progress import Progress
from anomalib_lite.callbacks.reporting import ReportingCallback
from anomalib_lite.visualization import render_heatmap  # its home before visualization.py

__all__ = ["AnomalyMetrics", "EpochTimer", "HeatmapExport", "Progress", "ReportingCallback", "render_heatmap"]
