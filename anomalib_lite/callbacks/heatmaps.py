"""One PNG per test image: input | ground truth | anomaly-map overlay, on a per-run colour scale;
and a grid of the test images that went most wrong, for the dashboards (TensorBoard, W&B)."""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from matplotlib import colormaps, font_manager
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from anomalib_lite.callbacks.reporting import ReportingCallback
from anomalib_lite.data.batch import Batch
from anomalib_lite.models.components import AnomalyModule, AnomalyOutput
from anomalib_lite.models.components.anomaly_module import COLOUR_SCALE_QUANTILE

LINE_HEIGHT = 13  # pixels per text line
FONT_SIZE = 11
MIN_PANEL_SIDE = 128  # smaller images are enlarged (nearest) so the sheet stays readable
COLOUR_BAR_WIDTH = 12
LABEL_WIDTH = 64


@functools.cache
def font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (matplotlib ships it): file names in any Latin, Greek or Cyrillic script render
    as letters, not boxes; Pillow's own font where matplotlib's cannot be found."""
    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=True), FONT_SIZE)
    except (OSError, ValueError):
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """`text` broken into lines no wider than `width` pixels (long words are cut, not dropped)."""
    lines, line = [], ""
    for char in text:
        if draw.textlength(line + char, font=font()) > width and line:
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
    scale: tuple[float, float, float] | None = None,
    anomalous: bool | None = None,
    top_source: str = "the validation maps",
) -> Image.Image:
    """image 3 x H x W in [0, 1]; normalized_map H x W in [0, 1] with 0.5 = pixel threshold.

    A header (the image's name and `score_text`, wrapped to the sheet's width, red when
    `anomalous`), then three panels - input | ground truth | overlay - and a colour bar, and a
    footer saying what the bar's numbers are. The overlay outlines in white the pixels above the
    pixel threshold; the ground-truth panel shows the mask (grey, "no mask", when there is none).
    `scale` = (bottom, pixel threshold, top) of the colour bar in the method's own units
    (`AnomalyModule.colour_scale`); `top_source` says where the top comes from (the footer says
    so). Images under 128 pixels a side are enlarged.
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
    low, threshold, high = scale if scale is not None else (0.0, 0.5, 1.0)
    footer_text = (
        f"colour bar: pixel scores; {threshold:.3g} = pixel threshold (the highest held-out normal pixel), "
        f"top {high:.3g} = 99.9th percentile of {top_source}"
    )
    header = _wrap(measure, title, sheet_w - 4) + _wrap(measure, score_text, sheet_w - 4)
    footer = _wrap(measure, footer_text, sheet_w - 4)
    top = len(header) * LINE_HEIGHT + 2
    sheet = Image.new("RGB", (sheet_w, top + LINE_HEIGHT + panel_h + len(footer) * LINE_HEIGHT + 2), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    title_lines = len(_wrap(measure, title, sheet_w - 4))
    for i, line in enumerate(header):
        colour = (200, 0, 0) if anomalous and i >= title_lines else (0, 0, 0)
        draw.text((2, 1 + i * LINE_HEIGHT), line, fill=colour, font=font())
    captions = ("input", "ground truth" if mask is not None else "no mask", "anomaly map")
    for i, (panel, caption) in enumerate(zip(panels, captions)):
        draw.text((i * panel_w + 2, top), caption, fill=(80, 80, 80), font=font())
        sheet.paste(panel, (i * panel_w, top + LINE_HEIGHT))
    for i, line in enumerate(footer):
        draw.text((2, top + LINE_HEIGHT + panel_h + 1 + i * LINE_HEIGHT), line, fill=(80, 80, 80), font=font())
    # Colour bar: the top at 1, the pixel threshold at 0.5, the bottom (median normal pixel) at 0.
    bar_x, bar_top = 3 * panel_w + 4, top + LINE_HEIGHT
    ramp = np.linspace(1, 0, panel_h, dtype=np.float32)[:, None].repeat(COLOUR_BAR_WIDTH, axis=1)
    sheet.paste(Image.fromarray(_colour(ramp, colormap).round().astype(np.uint8)), (bar_x, bar_top))
    draw.text((bar_x, top), "pixel", fill=(80, 80, 80), font=font())
    labels = ((0, f"{high:.3g}"), (panel_h // 2, f"{threshold:.3g} thr"), (panel_h - 1, f"{low:.3g}"))
    for y, text in labels:
        draw.line((bar_x + COLOUR_BAR_WIDTH, bar_top + y, bar_x + COLOUR_BAR_WIDTH + 3, bar_top + y), fill=(0, 0, 0))
        text_y = min(max(bar_top + y - LINE_HEIGHT // 2, bar_top), bar_top + panel_h - LINE_HEIGHT)
        draw.text((bar_x + COLOUR_BAR_WIDTH + 5, text_y), text, fill=(0, 0, 0), font=font())
    return sheet


def heatmap_name(image_name: str) -> str:
    """`000.png` -> `000_png.png`: the extension stays, as it is written, so 000.png, 000.PNG and
    000.jpg get a heatmap each (the image extensions hold no "_", so no two names meet)."""
    path = Path(image_name)
    return f"{path.stem}_{path.suffix.lstrip('.') or 'image'}.png"


def _save_atomically(image: Image.Image, path: Path) -> None:
    # Under DDP two ranks may write the same padded sample: never leave a half-written file.
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(handle)
    image.save(temporary)
    os.replace(temporary, path)

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


def compose_grid(sheets: list[Image.Image], columns: int = 2) -> Image.Image:
    """Sheets in rows of `columns`, each cell as large as the largest sheet."""
    columns = max(1, min(columns, len(sheets)))
    cell_w, cell_h = max(s.width for s in sheets), max(s.height for s in sheets)
    rows = -(-len(sheets) // columns)
    grid = Image.new("RGB", (columns * cell_w + (columns - 1) * 4, rows * cell_h + (rows - 1) * 4), (255, 255, 255))
    for i, sheet in enumerate(sheets):
        grid.paste(sheet, ((i % columns) * (cell_w + 4), (i // columns) * (cell_h + 4)))
    return grid


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
    values = torch.cat(samples).float()
    return float(values.kthvalue(max(1, math.ceil(COLOUR_SCALE_QUANTILE * values.numel()))).values)


class HeatmapExport(ReportingCallback):
    """Writes `<output_dir>/<defect_type>/<image stem>_<extension>.png` for up to `max_per_type` test images
    of every defect type (null: all), so each type is represented however large the test set.

    The colour scale is the one fitted on validation (`AnomalyModule.colour_scale`), its top raised
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
        threshold = float(pl_module.image_threshold)
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

    def colour_scale(self, trainer: L.Trainer, pl_module: AnomalyModule) -> tuple[tuple[float, float, float], str]:
        """(bottom, pixel threshold, top) for this test set's sheets, and where the top comes from."""
        floor, threshold, fitted_top = pl_module.colour_scale()
        test_top = test_maps_top(self._pixel_samples, trainer)
        if test_top is not None and test_top > fitted_top:
            return (floor, threshold, test_top), "the test maps"
        return (floor, threshold, fitted_top), "the validation maps"

    def _write_grid(self, trainer: L.Trainer, pl_module: AnomalyModule, scale: tuple[float, float, float], source: str) -> None:
        normal, anomalous = self._normal, self._anomalous
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, (normal, anomalous))
            normal = [t for ranked in gathered for t in ranked[0]]
            anomalous = [t for ranked in gathered for t in ranked[1]]
        if not trainer.is_global_zero or not (normal or anomalous):
            return
        threshold = float(pl_module.image_threshold)
        sheets = [
            render_heatmap(
                tile.image, tile.mask, pl_module.normalize_anomaly_map(tile.anomaly_map, top=scale[2]), tile.name,
                f"{verdict}: image score {tile.score:.3g}, image threshold {threshold:.3g}",
                colormap=self.colormap, scale=scale, anomalous=tile.score > threshold, top_source=source,
            )
            for tile, verdict in select_grid(normal, anomalous, threshold, self.grid_size)
        ]
        grid = compose_grid(sheets)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _save_atomically(grid, self.output_dir / "grid.png")
        log_image(trainer, GRID_TAG, grid)

    def _render_and_save(
        self, sheet: _Sheet, pl_module: AnomalyModule, scale: tuple[float, float, float], source: str
    ) -> None:
        normalized = pl_module.normalize_anomaly_map(sheet.anomaly_map, top=scale[2])
        drawn = render_heatmap(
            sheet.image.float() / 255, sheet.mask, normalized, sheet.title, sheet.score_text, colormap=self.colormap,
            scale=scale, anomalous=sheet.anomalous, top_source=source,
        )
        sheet.path.parent.mkdir(parents=True, exist_ok=True)
        _save_atomically(drawn, sheet.path)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: AnomalyModule) -> None:
        start = time.perf_counter()
        scale, source = self.colour_scale(trainer, pl_module)
        with ThreadPoolExecutor(max(1, self.workers), thread_name_prefix="heatmaps") as executor:
            jobs = [executor.submit(self._render_and_save, sheet, pl_module, scale, source) for sheet in self._sheets]
            for job in jobs:
                job.result()  # re-raises a worker's error here
        self._sheets, self._pixel_samples = [], []
        self._write_grid(trainer, pl_module, scale, source)
        self._normal, self._anomalous = [], []
        self._loop_seconds += time.perf_counter() - start
