"""One PNG per test image: input | ground truth | anomaly-map overlay, on a per-run colour scale;
and a grid of the test images that went most wrong, for the dashboards (TensorBoard, W&B)."""

from __future__ import annotations

import heapq
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from anomalib_lite.callbacks.reporting import ReportingCallback
from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import AnomalyModule, PostProcessor
from anomalib_lite.engine.post_processing import upper_quantile
from anomalib_lite.models.components import AnomalyOutput
from anomalib_lite.visualization import compose_grid, heatmap_name, render_heatmap, save_atomically

GRID_TAG = "test/heatmaps_worst_first"  # the grid's name in TensorBoard and W&B


@dataclass(order=True)
class _Tile:
    """A test image that may go into the grid; ordered by how wrong its verdict is (`badness`)."""

    badness: float
    sequence: int  # ties: first seen first
    score: float = field(compare=False)
    label: int = field(compare=False)
    name: str = field(compare=False)
    image: torch.Tensor = field(compare=False)
    mask: torch.Tensor | None = field(compare=False)
    anomaly_map: torch.Tensor = field(compare=False)  # in the method's units: normalised once the scale is known


def select_grid(normal: list[_Tile], anomalous: list[_Tile], threshold: float, size: int) -> list[tuple[_Tile, str]]:
    """(tile, verdict) for up to `size` tiles: false positives (highest score first) and false
    negatives (lowest first) alternately, then the correct verdicts closest to the threshold."""
    normal = sorted(normal, key=lambda t: -t.score)
    anomalous = sorted(anomalous, key=lambda t: t.score)
    false_pos = [(t, "FALSE POSITIVE") for t in normal if t.score > threshold]
    false_neg = [(t, "FALSE NEGATIVE") for t in anomalous if t.score <= threshold]
    true_neg = [(t, "normal, correct") for t in normal if t.score <= threshold]
    true_pos = [(t, "anomalous, correct") for t in anomalous if t.score > threshold]

    def alternate(first: list, second: list) -> list:
        pairs = itertools.zip_longest(first, second)
        return [item for pair in pairs for item in pair if item is not None]

    return (alternate(false_pos, false_neg) + alternate(true_neg, true_pos))[:size]


def log_image(trainer: L.Trainer, tag: str, image: Image.Image) -> list[str]:
    """`image` to every logger that shows images (TensorBoard, W&B); the names of those that took it."""
    taken = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, np.asarray(image), global_step=trainer.global_step, dataformats="HWC")
            logger.experiment.flush()
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[image], step=trainer.global_step)
        else:
            continue
        taken.append(type(logger).__name__)
    return taken


@dataclass
class _Sheet:
    """A heatmap to draw at the end of test, once the colour scale is known."""

    image: torch.Tensor  # uint8, 3 x H x W: what the sheet shows of the input, at a quarter of float32's memory
    mask: torch.Tensor | None
    anomaly_map: torch.Tensor
    title: str
    score_text: str
    anomalous: bool
    path: Path


PIXEL_SAMPLES_PER_MAP = 4096  # of every test map, for the colour scale's top


def test_maps_top(samples: list[torch.Tensor], trainer: L.Trainer) -> float | None:
    """The 99.9th percentile of the test maps' pixels (a strided sample of each), over every DDP rank."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, samples)
        samples = [sample for ranked in gathered for sample in ranked]
    if not samples:
        return None
    return upper_quantile(torch.cat(samples))


class HeatmapExport(ReportingCallback):
    """Writes `<output_dir>/<defect_type>/<image stem>_<extension>.png` for up to `max_per_type` test images
    of every defect type (null: all), so each type is represented however large the test set.

    The colour scale is the one fitted on validation (`PostProcessor.colour_scale`), its top raised
    to the 99.9th percentile of the test maps where they reach higher: defects keep their shape on
    the sheets instead of saturating (no label is used; thresholds and verdicts are unchanged). The
    sheets are therefore drawn at the end of test, in `workers` background threads (numpy, scipy
    and Pillow release the GIL), from the images and maps kept meanwhile (at most `max_per_type`
    per type; with null, every test image, as uint8). `heatmap_seconds` in metrics.json is the time
    the test loop spent on heatmaps (keeping them, then drawing them).

    With `grid_size` > 0, the test images whose verdicts went most wrong (worst false positives
    and false negatives first, then the correct ones closest to the threshold; every test image
    is a candidate, whatever `max_per_type`) are drawn into one grid: `<output_dir>/grid.png`,
    and an image (`test/heatmaps_worst_first`) in TensorBoard and W&B when those log the run.
    """

    def __init__(
        self, output_dir: str | Path, max_per_type: int | None = 30, colormap: str = "jet", workers: int = 1,
        grid_size: int = 16,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.max_per_type = max_per_type
        self.colormap = colormap
        self.workers = workers
        self.grid_size = grid_size
        self._written: dict[str, int] = {}
        self._sheets: list[_Sheet] = []
        self._pixel_samples: list[torch.Tensor] = []
        self._loop_seconds = 0.0
        # Grid candidates: min-heaps on badness, so the least wrong is dropped first.
        self._normal: list[_Tile] = []
        self._anomalous: list[_Tile] = []
        self._seen = 0

    def report(self) -> dict[str, Any]:
        return {"heatmaps": str(self.output_dir), "heatmap_seconds": round(self._loop_seconds, 3)}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: AnomalyModule) -> None:
        self._written, self._sheets, self._pixel_samples, self._loop_seconds = {}, [], [], 0.0
        self._normal, self._anomalous, self._seen = [], [], 0

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: AnomalyModule, outputs: AnomalyOutput, batch: Batch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        start = time.perf_counter()
        # Under DDP every rank writes its share of the cap.
        cap = None if self.max_per_type is None else -(-self.max_per_type // trainer.world_size)
        maps = outputs.anomaly_map.detach().float().cpu()
        scores = outputs.pred_score.detach().float().cpu()
        threshold = float(pl_module.post_processor.image_threshold)
        flat = maps.flatten(1)
        self._pixel_samples.append(flat[:, :: max(1, flat.shape[1] // PIXEL_SAMPLES_PER_MAP)].flatten().clone())
        for i, defect_type in enumerate(batch.defect_type):
            self._offer_to_grid(batch, i, float(scores[i]), maps[i])
            if cap is not None and self._written.get(defect_type, 0) >= cap:
                continue
            self._written[defect_type] = self._written.get(defect_type, 0) + 1
            name = Path(batch.image_path[i]).name
            anomalous = bool(scores[i] > threshold)
            self._sheets.append(_Sheet(
                (batch.image[i].detach().cpu() * 255).round().to(torch.uint8),
                batch.mask[i].cpu() if bool(batch.has_mask[i]) else None, maps[i].clone(), f"{defect_type}/{name}",
                f"image score {float(scores[i]):.3g}, image threshold {threshold:.3g}: {'ANOMALOUS' if anomalous else 'normal'}",
                anomalous, self.output_dir / defect_type / heatmap_name(name),
            ))
        self._loop_seconds += time.perf_counter() - start

    def _offer_to_grid(self, batch: Batch, i: int, score: float, anomaly_map: torch.Tensor) -> None:
        if self.grid_size <= 0:
            return
        label = int(batch.label[i])
        # Normal images are worse the higher they score, anomalous ones the lower.
        badness = score if label == 0 else -score
        heap = self._normal if label == 0 else self._anomalous
        self._seen += 1
        if len(heap) >= self.grid_size and badness <= heap[0].badness:
            return
        tile = _Tile(
            badness, -self._seen, score, label, f"{batch.defect_type[i]}/{Path(batch.image_path[i]).name}",
            batch.image[i].detach().cpu().clone(), batch.mask[i].detach().cpu().clone() if bool(batch.has_mask[i]) else None,
            anomaly_map.clone(),
        )
        (heapq.heappush if len(heap) < self.grid_size else heapq.heappushpop)(heap, tile)

    def colour_scale(self, trainer: L.Trainer, post_processor: PostProcessor) -> tuple[tuple[float, float, float], str]:
        """(bottom, pixel threshold, top) for this test set's sheets, and where the top comes from."""
        floor, threshold, fitted_top = post_processor.colour_scale()
        test_top = test_maps_top(self._pixel_samples, trainer)
        if test_top is not None and test_top > fitted_top:
            return (floor, threshold, test_top), "the test maps"
        return (floor, threshold, fitted_top), "the validation maps"

    def _write_grid(self, trainer: L.Trainer, post_processor: PostProcessor, scale: tuple[float, float, float], source: str) -> None:
        normal, anomalous = self._normal, self._anomalous
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (normal, anomalous))
            normal = [t for ranked in gathered for t in ranked[0]]
            anomalous = [t for ranked in gathered for t in ranked[1]]
        if not trainer.is_global_zero or not (normal or anomalous):
            return
        threshold = float(post_processor.image_threshold)
        sheets = [
            render_heatmap(
                tile.image, tile.mask, post_processor.normalize_anomaly_map(tile.anomaly_map, top=scale[2]), tile.name,
                f"{verdict}: image score {tile.score:.3g}, image threshold {threshold:.3g}",
                colormap=self.colormap, scale=scale, anomalous=tile.score > threshold, top_source=source,
            )
            for tile, verdict in select_grid(normal, anomalous, threshold, self.grid_size)
        ]
        grid = compose_grid(sheets)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_atomically(grid, self.output_dir / "grid.png")
        log_image(trainer, GRID_TAG, grid)

    def _render_and_save(
        self, sheet: _Sheet, post_processor: PostProcessor, scale: tuple[float, float, float], source: str
    ) -> None:
        normalized = post_processor.normalize_anomaly_map(sheet.anomaly_map, top=scale[2])
        drawn = render_heatmap(
            sheet.image.float() / 255, sheet.mask, normalized, sheet.title, sheet.score_text, colormap=self.colormap,
            scale=scale, anomalous=sheet.anomalous, top_source=source,
        )
        sheet.path.parent.mkdir(parents=True, exist_ok=True)
        save_atomically(drawn, sheet.path)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: AnomalyModule) -> None:
        start = time.perf_counter()
        post_processor = pl_module.post_processor
        scale, source = self.colour_scale(trainer, post_processor)
        with ThreadPoolExecutor(max(1, self.workers), thread_name_prefix="heatmaps") as executor:
            jobs = [executor.submit(self._render_and_save, sheet, post_processor, scale, source) for sheet in self._sheets]
            for job in jobs:
                job.result()  # re-raises a worker's error here
        self._sheets, self._pixel_samples = [], []
        self._write_grid(trainer, post_processor, scale, source)
        self._normal, self._anomalous = [], []
        self._loop_seconds += time.perf_counter() - start
