"""One PNG per test image: input | ground truth | anomaly-map overlay, on a per-run colour scale."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from matplotlib import colormaps
from PIL import Image, ImageDraw
from scipy import ndimage

HEADER_HEIGHT = 14


def _panel(array: np.ndarray, title: str) -> Image.Image:
    image = Image.fromarray(array)
    canvas = Image.new("RGB", (image.width, image.height + HEADER_HEIGHT), (255, 255, 255))
    canvas.paste(image, (0, HEADER_HEIGHT))
    ImageDraw.Draw(canvas).text((2, 1), title, fill=(0, 0, 0))
    return canvas


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
    coloured = (colormaps[colormap](heat)[..., :3] * 255).astype(np.float32)
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


class HeatmapExport(Callback):
    """Writes `<output_dir>/<defect_type>/<image stem>.png` for up to `max_per_type` test images
    of every defect type (null: all), so each type is represented however large the test set."""

    def __init__(self, output_dir: str | Path, max_per_type: int | None = 30, colormap: str = "jet") -> None:
        self.output_dir = Path(output_dir)
        self.max_per_type = max_per_type
        self.colormap = colormap
        self._written: dict[str, int] = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._written = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        # Under DDP every rank writes its share of the cap.
        cap = None if self.max_per_type is None else -(-self.max_per_type // trainer.world_size)
        normalized = pl_module.normalize_anomaly_map(outputs["anomaly_map"].detach())
        for i in range(len(batch["image"])):
            defect_type = batch["defect_type"][i]
            if cap is not None and self._written.get(defect_type, 0) >= cap:
                continue
            folder = self.output_dir / defect_type
            folder.mkdir(parents=True, exist_ok=True)
            mask = batch["mask"][i] if bool(batch["has_mask"][i]) else None
            score = float(outputs["pred_score"][i])
            threshold = float(pl_module.image_threshold)
            verdict = "ANOMALOUS" if score > threshold else "normal"
            sheet = render_heatmap(
                batch["image"][i], mask, normalized[i], f"{defect_type}/{Path(batch['image_path'][i]).name}",
                f"score {score:.3g} (thr {threshold:.3g}) {verdict}", colormap=self.colormap,
            )
            _save_atomically(sheet, folder / f"{Path(batch['image_path'][i]).stem}.png")
            self._written[defect_type] = self._written.get(defect_type, 0) + 1
