"""The predictions of a loop (validation, test), collected per batch and gathered once at its end,
over every DDP rank, in dataset order: what the thresholds and every metric are computed from."""

from __future__ import annotations

import lightning as L
import torch

from anomalib_lite.data.batch import Batch
from anomalib_lite.models.components.anomaly_map import AnomalyOutput
from anomalib_lite.utils.distributed import gather_samples

FIELDS = ("score", "map", "label", "mask", "has_mask", "index")


class PredictionCollector:
    """`add` every batch's output; `gather` returns score (N), map (N x H x W), label, mask (uint8),
    has_mask and index (N), one row per image of the dataset, as a single process would hold them."""

    def __init__(self) -> None:
        self._rows: dict[str, list[torch.Tensor]] = {}
        self.reset()

    def reset(self) -> None:
        self._rows = {key: [] for key in FIELDS}

    def __len__(self) -> int:
        return sum(len(index) for index in self._rows["index"])

    def add(self, output: AnomalyOutput, batch: Batch) -> None:
        rows = self._rows
        rows["score"].append(output.pred_score.detach().float().cpu())
        rows["map"].append(output.anomaly_map.detach().float().cpu())
        rows["label"].append(batch.label.cpu())
        rows["mask"].append(batch.mask.cpu().to(torch.uint8))
        rows["has_mask"].append(batch.has_mask.cpu())
        rows["index"].append(batch.index.cpu())

    def gather(self, module: L.LightningModule) -> dict[str, torch.Tensor]:
        """Every rank's rows, deduplicated and in dataset order (the collector is emptied)."""
        rows, index = self._rows, torch.cat(self._rows["index"])
        tensors = {key: torch.cat(value) for key, value in rows.items() if key != "index"}
        self.reset()
        return gather_samples(module, tensors, index, keep_index=True)
