#!/usr/bin/env python
"""A finished run's model scores its test folder alone: `anomalib-lite-predict` on the run's own
test images must give its predictions.csv; copies of them stored at other sizes go through the
same stored resize (their pixels differ, so their scores may move a little: this measures how much).

    python experiments/predict_check.py outputs/<run> [--sizes 1024 300] [--out outputs/predict_check]

Prints, per input (the original files, then each rescaled copy), the largest absolute and relative
score difference against the run's predictions.csv and how many verdicts changed.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def scores(path: Path, key) -> dict[str, tuple[float, int]]:  # noqa: ANN001
    with path.open() as handle:
        return {key(row): (float(row["score"]), int(row["predicted_anomalous"])) for row in csv.DictReader(handle)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 300])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "predict_check")
    args = parser.parse_args()
    by_name = lambda row: f"{Path(row['image_path']).parent.name}/{Path(row['image_path']).stem}"  # noqa: E731
    reference = scores(args.run / "predictions.csv", by_name)
    test_dir = Path(next(csv.DictReader((args.run / "predictions.csv").open()))["image_path"]).parent.parent
    inputs = {"original files": test_dir}
    for size in args.sizes:
        copy = args.out / "data" / f"{size}px"
        if not copy.is_dir():
            for image in sorted(test_dir.rglob("*.png")):
                target = copy / image.relative_to(test_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.open(image).convert("RGB").resize((size, size), Image.Resampling.LANCZOS).save(target)
        inputs[f"copies at {size} px"] = copy
    print("| input | images | largest score difference | largest relative | verdicts changed |\n|---|---|---|---|---|")
    for name, folder in inputs.items():
        output = args.out / args.run.name / name.replace(" ", "_")
        subprocess.run(
            [sys.executable, "-m", "anomalib_lite.predict", str(args.run), str(folder), "--output", str(output),
             "--overwrite", "--max-heatmaps", "20"],
            check=True, cwd=REPO,
        )
        predicted = scores(output / "predictions.csv", by_name)
        assert predicted.keys() == reference.keys(), "not the same images"
        difference = max(abs(predicted[k][0] - v[0]) for k, v in reference.items())
        relative = max(abs(predicted[k][0] - v[0]) / abs(v[0]) for k, v in reference.items())
        changed = sum(predicted[k][1] != v[1] for k, v in reference.items())
        print(f"| {name} | {len(predicted)} | {difference:.3g} | {relative:.3g} | {changed} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
