"""Contact sheet of DRAEM's synthetic training anomalies: 16 samples with their masks, made by the
Perlin synthesiser with DTD textures (dtd_subset) and with the package's procedural textures.

    python experiments/draem_synthesis_sheet.py [--category bottle] [--out experiments/draem_synthesis.png]

Every sample is drawn as in training (rotation of 30 % of the images, 3 augmenters per texture,
the authors' blend), except that each one is given an anomaly (training leaves half clean).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from anomalib_lite.data.anomaly_synthesis import PerlinSynthesizer
from anomalib_lite.data.image_io import read_image
from anomalib_lite.data.samples import ImageResize, list_images

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
TILE = 128


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().byte()
    return Image.fromarray((array.permute(1, 2, 0) if array.ndim == 3 else array).numpy())


def panel(images: torch.Tensor, source: str | None, title: str, seed: int) -> Image.Image:
    synthesizer = PerlinSynthesizer(source, anomaly_probability=1.0, redraw_empty_masks=True, seed=seed)
    augmented, masks, _ = synthesizer(synthesizer.rotate(images))
    columns, rows = 4, 4
    sheet = Image.new("RGB", (columns * 2 * TILE + (columns - 1) * 8, rows * TILE + (rows - 1) * 8 + 28), "white")
    ImageDraw.Draw(sheet).text((6, 8), title, fill="black")
    for index in range(columns * rows):
        row, column = divmod(index, columns)
        x, y = column * (2 * TILE + 8), 28 + row * (TILE + 8)
        sheet.paste(_to_pil(augmented[index]).resize((TILE, TILE)), (x, y))
        sheet.paste(_to_pil(masks[index]).convert("RGB").resize((TILE, TILE)), (x + TILE, y))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "draem_synthesis.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = list_images(DATA / "mvtec_ad" / args.category / "train" / "good")[:16]
    resize = ImageResize(256)
    images = torch.stack([resize.to_tensor(read_image(p)) for p in paths])
    panels = [
        panel(images, str(DATA / "dtd_subset"), f"DTD textures (dtd_subset), {args.category}: image | mask", args.seed),
        panel(images, None, f"procedural textures, {args.category}: image | mask", args.seed),
    ]
    sheet = Image.new("RGB", (panels[0].width, sum(p.height for p in panels) + 16), "white")
    sheet.paste(panels[0], (0, 0))
    sheet.paste(panels[1], (0, panels[0].height + 16))
    sheet.save(args.out)
    print(f"wrote {args.out} ({sheet.width} x {sheet.height})", np.asarray(sheet).shape)


if __name__ == "__main__":
    main()
