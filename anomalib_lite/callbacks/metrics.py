"""Test-set metrics, computed once over the whole test set at the end of test."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from anomalib_lite.callbacks.reporting import ReportingCallback
from anomalib_lite.data.batch import Batch
from anomalib_lite.data.datamodule import AnomalyDataModule
from anomalib_lite.engine import AnomalyModule, PredictionCollector
from anomalib_lite.metrics import compute_metrics
from anomalib_lite.models.components import AnomalyOutput

log = logging.getLogger(__name__)


class AnomalyMetrics(ReportingCallback):
    """Collects every test prediction, gathers them across ranks, computes and logs the metrics.

    The results are logged to every logger and reported for metrics.json (with `metrics_seconds`,
    the time the computation took); with `predictions_file`, every test image's score and
    verdict is written there as CSV.
    """

    def __init__(self, fpr_limit: float = 0.3, predictions_file: str | Path | None = None) -> None:
        self.fpr_limit = fpr_limit
        self.predictions_file = Path(predictions_file) if predictions_file else None
        self.results: dict[str, Any] = {}
        self._predictions = PredictionCollector()

    def report(self) -> dict[str, Any]:
        return dict(self.results)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: AnomalyModule) -> None:
        self._predictions.reset()

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: AnomalyModule, outputs: AnomalyOutput, batch: Batch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._predictions.add(outputs, batch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: AnomalyModule) -> None:
        start = time.perf_counter()
        gathered = self._predictions.gather(pl_module)
        with_masks = bool(gathered["has_mask"].all())
        threshold = float(pl_module.post_processor.image_threshold)
        self.results = compute_metrics(
            gathered["score"], gathered["label"],
            gathered["map"] if with_masks else None, gathered["mask"] if with_masks else None,
            fpr_limit=self.fpr_limit, image_threshold=threshold,
        )
        self.results["num_test_images"] = int(gathered["label"].numel())
        datamodule = trainer.datamodule
        if self.results["pixel_auroc"] is None:
            # Say why, in metrics.json and the run's summary.
            note = datamodule.pixel_metrics_note() if isinstance(datamodule, AnomalyDataModule) else None
            self.results["pixel_metrics_note"] = note or "no pixel metrics: the test masks hold no defect pixel"
        if self.predictions_file is not None and trainer.is_global_zero and isinstance(datamodule, AnomalyDataModule):
            # Paths by dataset index: rank 0 writes every rank's rows under DDP.
            self._write_predictions(gathered, datamodule.test_samples, threshold)
        numbers = {k: float(v) for k, v in self.results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        pl_module.log_dict(numbers, sync_dist=False)  # the notes (text) go to metrics.json only
        self.results["metrics_seconds"] = round(time.perf_counter() - start, 3)

    def _write_predictions(self, gathered: dict[str, torch.Tensor], samples: list, threshold: float) -> None:
        self.predictions_file.parent.mkdir(parents=True, exist_ok=True)
        with self.predictions_file.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image_path", "defect_type", "label", "score", "predicted_anomalous"])
            for index, label, score in zip(gathered["index"].tolist(), gathered["label"].tolist(), gathered["score"].tolist()):
                sample = samples[index]
                writer.writerow([str(sample.image_path), sample.defect_type, int(label), f"{score:.9g}", int(score > threshold)])
