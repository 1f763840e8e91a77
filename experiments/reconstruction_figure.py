"""Input | reconstruction | error for four test images per method, one row per run (issue 12).

    python experiments/reconstruction_figure.py RUN_DIR [RUN_DIR ...] [--out experiments/reconstructions.png]

Each RUN_DIR is a finished run (its `checkpoints/model.ckpt` and `predictions.csv`) of a method
whose model reconstructs its input (`components.Reconstructs`: the autoencoders, the GAN
generators). The same four test images in every row: the first good image and the first image of
three defect types (by sorted path). The error is |input - reconstruction| averaged over the
channels, coloured on one scale per row (0 to the row's largest error), so the four images of a
method compare; each row is labelled with the run's method, image AUROC and pixel AUROC.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

from anomalib_lite.data.image_io import read_image
from anomalib_lite.models.components import Reconstructs
from anomalib_lite.predict import load_model

TILE = 128
GAP = 6
LABEL = 22


def chosen_images(run: Path, count: int = 4) -> list[tuple[Path, str]]:
    """The first good test image and the first of `count - 1` defect types, by sorted path."""
    rows = sorted(csv.DictReader((run / "predictions.csv").open()), key=lambda row: row["image_path"])
    good = [row for row in rows if row["label"] == "0"][:1]
    by_type: dict[str, dict] = {}
    for row in rows:
        if row["label"] == "1":
            by_type.setdefault(row["defect_type"], row)
    picked = good + list(by_type.values())[: count - len(good)]
    return [(Path(row["image_path"]), row["defect_type"]) for row in picked]


def _tile(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array).resize((TILE, TILE), Image.Resampling.BILINEAR)


def method_row(run: Path, images: list[tuple[Path, str]]) -> Image.Image:
    module = load_model(run)
    if not isinstance(module.model, Reconstructs):
        raise SystemExit(f"{run}: {type(module.model).__name__} does not reconstruct its input")
    batch = torch.stack([module.image_resize.to_tensor(read_image(path)) for path, _ in images])
    with torch.no_grad():
        reconstructions = module.model.reconstruct(batch).clamp(0, 1)
    errors = (batch - reconstructions).abs().mean(dim=1)
    scale = float(errors.max()) or 1.0
    colour = colormaps["inferno"]
    metrics = json.loads((run / "metrics.json").read_text())
    title = (
        f"{metrics['method']} ({metrics.get('epochs')} epochs): image AUROC {metrics['image_auroc']:.3f}, "
        f"pixel AUROC {metrics['pixel_auroc']:.3f}; error scale 0-{scale:.3f}"
    )
    width = len(images) * (3 * TILE + 2 * GAP) + (len(images) - 1) * 3 * GAP
    row = Image.new("RGB", (width, TILE + LABEL), "white")
    draw = ImageDraw.Draw(row)
    draw.text((4, 5), title, fill="black")
    for index, ((_, defect), image, reconstruction, error) in enumerate(zip(images, batch, reconstructions, errors)):
        x = index * (3 * TILE + 5 * GAP)
        panels = [
            (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
            (reconstruction.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
            (colour((error / scale).numpy())[..., :3] * 255).round().astype(np.uint8),
        ]
        for offset, array in enumerate(panels):
            row.paste(_tile(array), (x + offset * (TILE + GAP), LABEL))
        draw.text((x + 4, LABEL + 4), defect, fill="white")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "reconstructions.png")
    args = parser.parse_args()
    images = chosen_images(args.runs[0], args.images)
    rows = [method_row(run, images) for run in args.runs]
    header = Image.new("RGB", (rows[0].width, LABEL), "white")
    ImageDraw.Draw(header).text((4, 5), "each image: input | reconstruction | |input - reconstruction| (inferno)", fill="black")
    sheet = Image.new("RGB", (rows[0].width, LABEL + sum(r.height + GAP for r in rows)), "white")
    sheet.paste(header, (0, 0))
    y = LABEL
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height + GAP
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"{args.out}: {len(rows)} methods x {len(images)} images ({', '.join(d for _, d in images)})")


if __name__ == "__main__":
    main()
