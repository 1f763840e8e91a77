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

LINE_HEIGHT = 13  # pixels per text line (Pillow's default font)
MIN_PANEL_SIDE = 128  # smaller images are enlarged (nearest) so the sheet stays readable
COLOUR_BAR_WIDTH = 12
LABEL_WIDTH = 64


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """`text` broken into lines no wider than `width` pixels (long words are cut, not dropped)."""
    lines, line = [], ""
    for char in text:
        if draw.textlength(line + char) > width and line:
            cut = line.rfind(" ") if " " in line.strip() else -1
            lines.append(line[:cut] if cut > 0 else line)
            line = (line[cut + 1:] if cut > 0 else "") + char
        else:
            line += char
    return lines + [line] if line else lines


@functools.cache
def _colormap_table(name: str) -> np.ndarray:
    """The colormap's 256 RGB entries, 0-255 as float32 (what `colormaps[name](values)` looks up)."""
    return (colormaps[name](np.arange(256))[:, :3] * 255).astype(np.float32)


def _colour(heat: np.ndarray, colormap: str) -> np.ndarray:
    # matplotlib's own lookup (value x 256, clipped to the last of its 256 entries), done once per colormap.
    return _colormap_table(colormap)[np.minimum((heat * 256).astype(np.int64), 255)]


def render_heatmap(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    normalized_map: torch.Tensor,
    title: str,
    score_text: str,
    colormap: str = "jet",
    alpha: float = 0.5,
    scale: tuple[float, float] | None = None,
    anomalous: bool | None = None,
) -> Image.Image:
    """image 3 x H x W in [0, 1]; normalized_map H x W in [0, 1] with 0.5 = pixel threshold.

    A header (the image's name and `score_text`, wrapped to the sheet's width, red when
    `anomalous`), then three panels - input | ground truth | overlay - and a colour bar. The
    overlay outlines in white the pixels above the threshold; the ground-truth panel shows the
    mask (grey, "no mask", when there is none). `scale` = (map value at 0, pixel threshold) labels
    the colour bar in the method's own units. Images under 128 pixels a side are enlarged.
    """
    rgb = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    heat = normalized_map.cpu().numpy()
    overlay = ((1 - alpha) * rgb + alpha * _colour(heat, colormap)).round().astype(np.uint8)
    above = heat >= 0.5
    overlay[above & ~ndimage.binary_erosion(above)] = 255
    if mask is not None:
        truth = np.repeat((mask.cpu().numpy() > 0)[..., None] * 255, 3, axis=2).astype(np.uint8)
    else:
        truth = np.full_like(rgb, 128)
    height, width = rgb.shape[:2]
    factor = max(1, -(-MIN_PANEL_SIDE // min(height, width)))
    panels = [Image.fromarray(a).resize((width * factor, height * factor), Image.Resampling.NEAREST) for a in (rgb, truth, overlay)]
    panel_w, panel_h = panels[0].size
    sheet_w = 3 * panel_w + COLOUR_BAR_WIDTH + LABEL_WIDTH + 8
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header = _wrap(measure, title, sheet_w - 4) + _wrap(measure, score_text, sheet_w - 4)
    top = len(header) * LINE_HEIGHT + 2
    sheet = Image.new("RGB", (sheet_w, top + LINE_HEIGHT + panel_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    title_lines = len(_wrap(measure, title, sheet_w - 4))
    for i, line in enumerate(header):
        colour = (200, 0, 0) if anomalous and i >= title_lines else (0, 0, 0)
        draw.text((2, 1 + i * LINE_HEIGHT), line, fill=colour)
    captions = ("input", "ground truth" if mask is not None else "no mask", "anomaly map")
    for i, (panel, caption) in enumerate(zip(panels, captions)):
        draw.text((i * panel_w + 2, top), caption, fill=(80, 80, 80))
        sheet.paste(panel, (i * panel_w, top + LINE_HEIGHT))
    # Colour bar: 1 at the top, the threshold (0.5) in the middle, 0 at the bottom.
    bar_x, bar_top = 3 * panel_w + 4, top + LINE_HEIGHT
    ramp = np.linspace(1, 0, panel_h, dtype=np.float32)[:, None].repeat(COLOUR_BAR_WIDTH, axis=1)
    sheet.paste(Image.fromarray(_colour(ramp, colormap).round().astype(np.uint8)), (bar_x, bar_top))
    low, threshold = scale if scale is not None else (0.0, 0.5)
    labels = ((0, low + 2 * (threshold - low)), (panel_h // 2, threshold), (panel_h - 1, low))
    for y, value in labels:
        text = f"{value:.3g}" + (" thr" if y == panel_h // 2 else "")
        draw.line((bar_x + COLOUR_BAR_WIDTH, bar_top + y, bar_x + COLOUR_BAR_WIDTH + 3, bar_top + y), fill=(0, 0, 0))
        text_y = min(max(bar_top + y - LINE_HEIGHT // 2, bar_top), bar_top + panel_h - LINE_HEIGHT)
        draw.text((bar_x + COLOUR_BAR_WIDTH + 5, text_y), text, fill=(0, 0, 0))
    return sheet


def heatmap_name(image_name: str) -> str:
    """`000.png` -> `000_png.png`: the extension stays, so 000.png and 000.jpg get a heatmap each."""
    path = Path(image_name)
    return f"{path.stem}_{path.suffix.lstrip('.').lower() or 'image'}.png"


def _save_atomically(image: Image.Image, path: Path) -> None:
    # Under DDP two ranks may write the same padded sample: never leave a half-written file.
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(handle)
    image.save(temporary)
    os.replace(temporary, path)


class HeatmapExport(ReportingCallback):
    """Writes `<output_dir>/<defect_type>/<image stem>_<extension>.png` for up to `max_per_type` test images
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
        scale = (float(pl_module.pixel_floor), float(pl_module.pixel_threshold))
        for i, defect_type in enumerate(batch.defect_type):
            if cap is not None and self._written.get(defect_type, 0) >= cap:
                continue
            self._written[defect_type] = self._written.get(defect_type, 0) + 1
            name = Path(batch.image_path[i]).name
            anomalous = bool(scores[i] > threshold)
            job = (
                batch.image[i].cpu(), batch.mask[i].cpu() if bool(batch.has_mask[i]) else None, normalized[i],
                f"{defect_type}/{name}",
                f"score {float(scores[i]):.3g}, threshold {threshold:.3g}: {'ANOMALOUS' if anomalous else 'normal'}",
                scale, anomalous, self.output_dir / defect_type / heatmap_name(name),
            )
            while len(self._pending) >= self.max_pending:
                self._pending.popleft().result()
            self._pending.append(self._executor.submit(self._render_and_save, *job))
        self._loop_seconds += time.perf_counter() - start

    def _render_and_save(self, image, mask, normalized, title, score_text, scale, anomalous, path: Path) -> None:  # noqa: ANN001
        sheet = render_heatmap(
            image, mask, normalized, title, score_text, colormap=self.colormap, scale=scale, anomalous=anomalous
        )
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
