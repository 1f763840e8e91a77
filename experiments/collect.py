#!/usr/bin/env python
"""Collect the metrics.json files of a sweep (or any folder of runs) into one table.

    python experiments/collect.py outputs/multirun/2026-11-21_10-00-00 [--csv results.csv]

Prints a markdown table per metric (method[/backbone] x category, a mean column and a mean row)
and writes every run's row to CSV (default: <sweep dir>/results.csv). `--rows method num_shots`
makes the rows from other metrics.json fields (e.g. a few-shot table).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max", "pixel_f1max", "image_ap", "pixel_ap")
VALIDATION = ("val_synthetic_image_auroc", "val_synthetic_pixel_auroc", "val_synthetic_aupro")
COLUMNS = (
    "method", "backbone", "dataset", "category", "seed", "num_shots", "num_train_images", *METRICS, *VALIDATION,
    "epochs", "best_epoch", "seconds_per_epoch", "fit_seconds", "validate_seconds", "test_seconds",
    "test_inference_seconds", "metrics_seconds", "heatmap_seconds", "run_dir",
)


def load_runs(sweep_dir: Path) -> list[dict]:
    runs = []
    for path in sorted(sweep_dir.rglob("metrics.json")):
        record = json.loads(path.read_text())
        record["run_dir"] = str(path.parent)
        runs.append(record)
    return runs


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(runs: list[dict], metric: str, rows: list[str] | None = None) -> str:
    """Rows: method (and backbone when several) or the `rows` fields; columns: categories, then the mean."""
    several_backbones = len({r.get("backbone") for r in runs}) > 1

    def row_key(run: dict) -> str:
        if rows:
            return " ".join(f"{field}={run.get(field)}" if field != "method" else str(run["method"]) for field in rows)
        return f"{run['method']} ({run['backbone']})" if several_backbones else run["method"]

    categories = sorted({r["category"] for r in runs})
    cells: dict[str, dict[str, float | None]] = defaultdict(dict)
    for run in runs:
        cells[row_key(run)][run["category"]] = run.get(metric)
    lines = [f"| {metric} | " + " | ".join(categories) + " | mean |", "|---" * (len(categories) + 2) + "|"]
    for key in sorted(cells):
        values = [cells[key].get(c) for c in categories]
        present = [v for v in values if v is not None]
        mean = sum(present) / len(present) if present else None
        lines.append(f"| {key} | " + " | ".join(_fmt(v) for v in values) + f" | {_fmt(mean)} |")
    # The mean row: every method's mean per category.
    column_means = []
    for category in categories:
        present = [cells[k][category] for k in cells if cells[k].get(category) is not None]
        column_means.append(sum(present) / len(present) if present else None)
    present = [v for v in column_means if v is not None]
    lines.append("| mean | " + " | ".join(_fmt(v) for v in column_means) + f" | {_fmt(sum(present) / len(present) if present else None)} |")
    return "\n".join(lines)


def write_csv(runs: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--csv", type=Path, default=None, help="CSV output (default: <sweep_dir>/results.csv)")
    parser.add_argument("--metrics", nargs="+", default=["image_auroc", "pixel_auroc", "pixel_aupro"])
    parser.add_argument("--rows", nargs="+", default=None, help="metrics.json fields that name a row")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"collect: error: not a folder: {args.sweep_dir}", file=sys.stderr)
        return 2
    runs = load_runs(args.sweep_dir)
    if not runs:
        print(f"collect: error: no metrics.json under {args.sweep_dir}", file=sys.stderr)
        return 2
    for metric in args.metrics:
        print(markdown_table(runs, metric, args.rows) + "\n")
    csv_path = args.csv or args.sweep_dir / "results.csv"
    write_csv(runs, csv_path)
    print(f"{len(runs)} runs -> {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
