"""What CPR retrieves and where it looks: one row per test image of a finished CPR run.

    python experiments/cpr_retrieval_figure.py RUN_DIR [--out experiments/cpr_retrieval.png] [--count 4]

Each row: the test image | its foreground estimate (FEB) | the three training images the global
retrieval ranks first | the anomaly map (one colour scale for the whole figure). The images are
the first good test image and the first image of `count - 1` defect types, by sorted path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw
from reconstruction_figure import chosen_images  # this folder is on the path when run as a script

from anomalib_lite.data.image_io import read_image
from anomalib_lite.models.cpr import CprModel
from anomalib_lite.predict import load_model

TILE = 128
GAP = 6
LABEL = 22
RETRIEVED = 3


def _tile(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array).resize((TILE, TILE), Image.Resampling.BILINEAR)


def _rgb(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _colour(values: torch.Tensor, scale: float, name: str = "inferno") -> np.ndarray:
    return (colormaps[name]((values / scale).clamp(0, 1).numpy())[..., :3] * 255).round().astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("experiments/cpr_retrieval.png"))
    parser.add_argument("--count", type=int, default=4)
    args = parser.parse_args(argv)
    module = load_model(args.run)
    model = module.model
    if not isinstance(model, CprModel):
        raise SystemExit(f"{args.run}: not a CPR run ({type(model).__name__})")
    images = chosen_images(args.run, args.count)
    batch = torch.stack([module.image_resize.to_tensor(read_image(path)) for path, _ in images])
    with torch.no_grad():
        features = model.feature_extractor(batch)[model.levels[0]]
        neighbours = model.retrieve(features)[:, :RETRIEVED]
        foreground = F.interpolate(model.foreground(features)[:, None], size=batch.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        maps = model(batch).anomaly_map
    scale = float(maps.max()) or 1.0
    metrics = json.loads((args.run / "metrics.json").read_text())
    columns = 3 + RETRIEVED
    figure = Image.new("RGB", (columns * (TILE + GAP), len(images) * (TILE + LABEL) + LABEL), "white")
    draw = ImageDraw.Draw(figure)
    draw.text((4, 5), f"CPR on {metrics['category']}: image AUROC {metrics['image_auroc']:.3f}, pixel AUROC "
              f"{metrics['pixel_auroc']:.3f}. image | foreground | top-{RETRIEVED} retrieved | map (0-{scale:.2f})", fill="black")
    for row, ((_, defect), image, fg, retrieved, anomaly_map) in enumerate(zip(images, batch, foreground, neighbours, maps)):
        y = LABEL + row * (TILE + LABEL) + LABEL
        panels = [_rgb(image), _colour(fg, 1.0, "gray")]
        panels += [_rgb(model.train_images[index].float() / 255) for index in retrieved.tolist()]
        panels.append(_colour(anomaly_map, scale))
        for column, array in enumerate(panels):
            figure.paste(_tile(array), (column * (TILE + GAP), y))
        draw.text((4, y - LABEL + 5), defect, fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
