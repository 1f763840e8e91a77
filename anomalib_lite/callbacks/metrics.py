"""Test-set metrics, computed once over the whole test set at the end of test."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from anomalib_lite import metrics
from anomalib_lite.errors import UserInputError
from anomalib_lite.utils.distributed import gather_samples

log = logging.getLogger(__name__)


def compute_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    anomaly_maps: torch.Tensor | None,
    masks: torch.Tensor | None,
    fpr_limit: float = 0.3,
    image_threshold: float | None = None,
) -> dict[str, float | None]:
    """Image AUROC/F1-max always; pixel AUROC/F1-max/AUPRO when masks are given."""
    if not bool((labels == 1).any()):
        raise UserInputError("the test set has no anomalous images: AUROC, F1 and AUPRO need defective images")
    results: dict[str, float | None] = {
        "image_auroc": metrics.auroc(scores, labels),
        "image_f1max": metrics.f1_max(scores, labels),
        "pixel_auroc": None,
        "pixel_aupro": None,
        "pixel_f1max": None,
    }
    if image_threshold is not None and image_threshold == image_threshold:  # not NaN
        results["image_f1_at_val_threshold"] = metrics.f1_at_threshold(scores, labels, image_threshold)
    if anomaly_maps is not None and masks is not None and bool(masks.any()):
        results["pixel_auroc"] = metrics.auroc(anomaly_maps, masks)
        results["pixel_f1max"] = metrics.f1_max(anomaly_maps, masks)
        results["pixel_aupro"] = metrics.aupro(anomaly_maps, masks, fpr_limit=fpr_limit)
    return results


class AnomalyMetrics(Callback):
    """Collects every test prediction, gathers them across ranks, computes and logs the metrics.

    The results are logged to every logger and kept in `self.results` for metrics.json; with
    `predictions_file`, every test image's score and verdict is written there as CSV.
    """

    def __init__(self, fpr_limit: float = 0.3, predictions_file: str | Path | None = None) -> None:
        self.fpr_limit = fpr_limit
        self.predictions_file = Path(predictions_file) if predictions_file else None
        self.results: dict[str, float | None] = {}
        self._reset()

    def _reset(self) -> None:
        self._scores, self._maps, self._masks, self._labels, self._index, self._has_mask = [], [], [], [], [], []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self._scores.append(outputs["pred_score"].detach().float().cpu())
        self._maps.append(outputs["anomaly_map"].detach().float().cpu())
        self._masks.append(batch["mask"].cpu().to(torch.uint8))
        self._labels.append(torch.as_tensor(batch["label"]).cpu())
        self._index.append(torch.as_tensor(batch["index"]).cpu())
        self._has_mask.append(torch.as_tensor(batch["has_mask"]).cpu())

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gathered = gather_samples(
            pl_module,
            {
                "score": torch.cat(self._scores), "map": torch.cat(self._maps), "mask": torch.cat(self._masks),
                "label": torch.cat(self._labels), "has_mask": torch.cat(self._has_mask),
            },
            torch.cat(self._index),
            keep_index=True,
        )
        self._reset()
        with_masks = bool(gathered["has_mask"].all())
        threshold = getattr(pl_module, "image_threshold", None)
        self.results = compute_metrics(
            gathered["score"], gathered["label"],
            gathered["map"] if with_masks else None, gathered["mask"] if with_masks else None,
            fpr_limit=self.fpr_limit,
            image_threshold=float(threshold) if threshold is not None else None,
        )
        self.results["num_test_images"] = int(gathered["label"].numel())
        if self.predictions_file is not None and trainer.is_global_zero:
            # Paths by dataset index: rank 0 writes every rank's rows under DDP.
            samples = getattr(trainer.datamodule, "test_samples", None) or []
            self._write_predictions(gathered, samples, float(threshold) if threshold is not None else float("nan"))
        pl_module.log_dict({k: float(v) for k, v in self.results.items() if v is not None}, sync_dist=False)

    def _write_predictions(self, gathered: dict[str, torch.Tensor], samples: list, threshold: float) -> None:
        self.predictions_file.parent.mkdir(parents=True, exist_ok=True)
        with self.predictions_file.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image_path", "defect_type", "label", "score", "predicted_anomalous"])
            for index, label, score in zip(gathered["index"].tolist(), gathered["label"].tolist(), gathered["score"].tolist()):
                path, defect = (str(samples[index].image_path), samples[index].defect_type) if index < len(samples) else ("", "")
                writer.writerow([path, defect, int(label), f"{score:.6g}", int(score > threshold)])
