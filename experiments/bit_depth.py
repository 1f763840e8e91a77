#!/usr/bin/env python
"""The same category stored three ways must score the same: 8-bit PNGs with 0/255 masks (as
shipped), 16-bit RGB TIFFs (each value x 257) with 0/255 masks, and 8-bit PNGs with 0/1 masks.

    python experiments/bit_depth.py [--category bottle] [--method patchcore] [--out outputs/bit_depth]

Writes the two converted copies under --out (never into the shared data), runs the offline
benchmark setting (experiment=lite0_mvtec) on each, and prints every metric side by side with the
largest per-image score difference against the 8-bit run (predictions.csv).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max", "pixel_f1max", "image_ap", "pixel_ap")


def convert(source: Path, target: Path, sixteen_bit: bool, zero_one_masks: bool) -> None:
    for image in sorted(source.rglob("*.png")):
        relative = image.relative_to(source)
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        is_mask = relative.parts[0] == "ground_truth"
        array = np.asarray(Image.open(image))
        if is_mask:
            Image.fromarray(((array > 0) * (1 if zero_one_masks else 255)).astype(np.uint8)).save(destination)
        elif sixteen_bit:
            tifffile.imwrite(destination.with_suffix(".tif"), array.astype(np.uint16) * 257)
        else:
            Image.fromarray(array).save(destination)


def run(root: Path, category: str, method: str, run_dir: Path) -> dict:
    if not (run_dir / "metrics.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "anomalib_lite", "experiment=lite0_mvtec", f"method={method}", f"dataset.root={root}",
             f"dataset.category={category}", f"hydra.run.dir={run_dir}", "callbacks.progress.mode=lines"],
            check=True, cwd=REPO,
        )
    return json.loads((run_dir / "metrics.json").read_text())


def scores(run_dir: Path) -> dict[str, float]:
    with (run_dir / "predictions.csv").open() as handle:
        return {Path(row["image_path"]).stem + "/" + row["defect_type"]: float(row["score"]) for row in csv.DictReader(handle)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "datasets" / "mvtec_ad")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--method", default="patchcore")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bit_depth")
    args = parser.parse_args()
    variants = {"8-bit, 0/255 masks": args.data_dir}
    for name, sixteen, zero_one in (("16-bit TIFF, 0/255 masks", True, False), ("8-bit, 0/1 masks", False, True)):
        root = args.out / "data" / name.split(",")[0].replace(" ", "_").replace("-", "") / name.split(", ")[1].replace("/", "_")
        if not (root / args.category).is_dir():
            convert(args.data_dir / args.category, root / args.category, sixteen, zero_one)
        variants[name] = root
    results, predictions = {}, {}
    for index, (name, root) in enumerate(variants.items()):
        run_dir = args.out / "runs" / f"{index}_{args.method}"
        results[name] = run(root, args.category, args.method, run_dir)
        predictions[name] = scores(run_dir)
    names = list(variants)
    print("| metric | " + " | ".join(names) + " |\n|---" * 1 + "|---" * len(names) + "|")
    for metric in METRICS:
        print(f"| {metric} | " + " | ".join(f"{results[n][metric]:.6f}" for n in names) + " |")
    reference = predictions[names[0]]
    for name in names[1:]:
        difference = max(abs(predictions[name][key] - value) for key, value in reference.items())
        relative = max(abs(predictions[name][key] - value) / abs(value) for key, value in reference.items())
        print(f"{name}: largest per-image score difference {difference:.3g} (relative {relative:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
