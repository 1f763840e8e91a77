"""Pictures of a model's verdicts: the heatmap sheet of one image (input | ground truth | anomaly
map, with the verdict and the colour scale) and grids of sheets. Used by the test-time heatmap
callback and by predict, so both draw the same picture. Plain numpy, Pillow and matplotlib's
colormaps and font: imports nothing of the package.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps, font_manager
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

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
    (`PostProcessor.colour_scale`); `top_source` says where the top comes from (the footer says
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


def save_atomically(image: Image.Image, path: Path) -> None:
    # Under DDP two ranks may write the same padded sample: never leave a half-written file.
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(handle)
    image.save(temporary)
    os.replace(temporary, path)


def compose_grid(sheets: list[Image.Image], columns: int = 2) -> Image.Image:
    """Sheets in rows of `columns`, each cell as large as the largest sheet."""
    columns = max(1, min(columns, len(sheets)))
    cell_w, cell_h = max(s.width for s in sheets), max(s.height for s in sheets)
    rows = -(-len(sheets) // columns)
    grid = Image.new("RGB", (columns * cell_w + (columns - 1) * 4, rows * cell_h + (rows - 1) * 4), (255, 255, 255))
    for i, sheet in enumerate(sheets):
        grid.paste(sheet, ((i % columns) * (cell_w + 4), (i // columns) * (cell_h + 4)))
    return grid
