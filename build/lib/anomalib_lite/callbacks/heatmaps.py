"""One PNG per test image: input | ground truth | anomaly-map overlay, on a per-run colour scale."""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw
from scipy import ndimage

from anomalib_lite.callbacks.reporting import ReportingCallback
from anomalib_lite.data.batch import Batch
from anomalib_lite.models.components import AnomalyModule, AnomalyOutput

HEADER_HEIGHT = 14


def _panel(array: np.ndarray, title: str) -> Image.Image:
    image = Image.fromarray(array)
    canvas = Image.new("RGB", (image.width, image.height + HEADER_HEIGHT), (255, 255, 255))
    canvas.paste(image, (0, HEADER_HEIGHT))
    ImageDraw.Draw(canvas).text((2, 1), title, fill=(0, 0, 0))
    return canvas


@functools.cache
def _colormap_table(name: str) -> np.ndarray:
    """The colormap's 256 RGB entries, 0-255 as float32 (what `colormaps[name](values)` looks up)."""
    return (colormaps[name](np.arange(256))[:, :3] * 255).astype(np.float32)


def render_heatmap(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    normalized_map: torch.Tensor,
    title: str,
    score_text: str,
    colormap: str = "jet",
    alpha: float = 0.5,
) -> Image.Image:
    """image 3 x H x W in [0, 1]; normalized_map H x W in [0, 1] with 0.5 = pixel threshold.

    The overlay outlines in white the pixels above the threshold; the ground-truth panel shows
    the mask (grey with 'no mask' when there is none).
    """
    rgb = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    heat = normalized_map.cpu().numpy()
    # matplotlib's own lookup (value x 256, clipped to the last of its 256 entries), done once per colormap.
    coloured = _colormap_table(colormap)[np.minimum((heat * 256).astype(np.int64), 255)]
    overlay = ((1 - alpha) * rgb + alpha * coloured).round().astype(np.uint8)
    above = heat >= 0.5
    outline = above & ~ndimage.binary_erosion(above)
    overlay[outline] = 255
    if mask is not None:
        truth = np.repeat((mask.cpu().numpy() > 0)[..., None] * 255, 3, axis=2).astype(np.uint8)
        truth_title = "ground truth"
    else:
        truth = np.full_like(rgb, 128)
        truth_title = "ground truth: no mask"
    panels = [_panel(rgb, title), _panel(truth, truth_title), _panel(overlay, score_text)]
    sheet = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), (255, 255, 255))
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * panels[0].width, 0))
    return sheet


def _save_atomically(image: Image.Image, path: Path) -> None:
    # Under DDP two ranks may write the same padded sample: never leave a half-written file.
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(handle)
    image.save(temporary)
    os.replace(temporary, path)


class HeatmapExport(ReportingCallback):
    """Writes `<output_dir>/<defect_type>/<image stem>.png` for up to `max_per_type` test images
    of every defect type (null: all), so each type is represented however large the test set.

    Rendering and PNG encoding run in `workers` background threads (numpy, scipy and Pillow
    release the GIL for this work), so the test loop goes on with the next batch meanwhile; at the
    end of test the loop waits for what is left. `heatmap_seconds` in metrics.json is the time the
    loop spent on heatmaps (handing images over and that final wait).
    """

    max_pending = 64  # images handed over but not yet written: bounds the memory they hold

    def __init__(
        self, output_dir: str | Path, max_per_type: int | None = 30, colormap: str = "jet", workers: int = 1
    ) -> None:
        self.output_dir = Path(output_dir)
        self.max_per_type = max_per_type
        self.colormap = colormap
        self.workers = workers
        self._written: dict[str, int] = {}
        self._pending: deque[Future] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._loop_seconds = 0.0

    def report(self) -> dict[str, Any]:
        return {"heatmaps": str(self.output_dir), "heatmap_seconds": round(self._loop_seconds, 3)}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: AnomalyModule) -> None:
        self._written, self._pending, self._loop_seconds = {}, deque(), 0.0
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="heatmaps")

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: AnomalyModule, outputs: AnomalyOutput, batch: Batch, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        start = time.perf_counter()
        # Under DDP every rank writes its share of the cap.
        cap = None if self.max_per_type is None else -(-self.max_per_type // trainer.world_size)
        normalized = pl_module.normalize_anomaly_map(outputs.anomaly_map.detach()).cpu()
        scores = outputs.pred_score.detach().float().cpu()
        threshold = float(pl_module.image_threshold)
        for i, defect_type in enumerate(batch.defect_type):
            if cap is not None and self._written.get(defect_type, 0) >= cap:
                continue
            self._written[defect_type] = self._written.get(defect_type, 0) + 1
            name = Path(batch.image_path[i]).name
            verdict = "ANOMALOUS" if scores[i] > threshold else "normal"
            job = (
                batch.image[i].cpu(), batch.mask[i].cpu() if bool(batch.has_mask[i]) else None, normalized[i],
                f"{defect_type}/{name}", f"score {float(scores[i]):.3g} (thr {threshold:.3g}) {verdict}",
                self.output_dir / defect_type / f"{Path(name).stem}.png",
            )
            while len(self._pending) >= self.max_pending:
                self._pending.popleft().result()
            self._pending.append(self._executor.submit(self._render_and_save, *job))
        self._loop_seconds += time.perf_counter() - start

    def _render_and_save(self, image, mask, normalized, title, score_text, path: Path) -> None:  # noqa: ANN001
        sheet = render_heatmap(image, mask, normalized, title, score_text, colormap=self.colormap)
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_atomically(sheet, path)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: AnomalyModule) -> None:
        start = time.perf_counter()
        try:
            while self._pending:
                self._pending.popleft().result()  # re-raises a worker's error here
        finally:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._loop_seconds += time.perf_counter() - start
