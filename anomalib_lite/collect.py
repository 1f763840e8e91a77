"""The `anomalib-lite-collect` command: the metrics.json files of a sweep (or any folder of runs) in one table.

    anomalib-lite-collect outputs/multirun/2026-11-21_10-00-00 [--csv results.csv]

Prints a markdown table per metric (a row per configuration x a column per category, a mean
column and a mean row) and writes every run's row to CSV (default: <sweep dir>/results.csv).
No run is hidden: the settings that differ between runs of the same method (read from each run's
config.yaml: image size, seed, coreset ratio, ...) name the rows and get their own CSV columns,
and runs that still share a cell are told apart by their folder. `--rows method num_shots` makes
the rows from chosen metrics.json or config fields instead (e.g. a few-shot table); with
`--aggregate`, the runs that share a row and a category (e.g. ten seeds) make one cell, their
mean +- standard deviation (n).
A sweep's failed jobs (with why) and the jobs that never ran are listed after the tables
(`sweeps.sweep_status`), and the command then exits 1: a table with holes says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from anomalib_lite.run_dir import OwnedFiles
from anomalib_lite.sweeps import sweep_status

COLLECT_RECORD = ".anomalib_lite_collect.json"  # beside the CSV: the CSV files this command wrote there

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max", "pixel_f1max", "image_ap", "pixel_ap")
VALIDATION = ("val_synthetic_image_auroc", "val_synthetic_pixel_auroc", "val_synthetic_aupro")
COLUMNS = (
    "method", "backbone", "dataset", "category", "seed", "num_shots", "num_train_images", *METRICS, *VALIDATION,
    "epochs", "best_epoch", "seconds_per_epoch", "fit_seconds", "validate_seconds", "test_seconds",
    "test_inference_seconds", "metrics_seconds", "heatmap_seconds", "run_dir",
)


# Where a run writes, not how it ran: never a reason to tell runs apart.
OUTPUT_SETTINGS = re.compile(r"^paths\.|_target_$|(^|\.)(save_dir|output_dir|default_root_dir|predictions_file)$")
# The table's own axes, shown anyway.
AXES = ("method", "backbone", "dataset", "category")
BACKBONE = re.compile(r"(^|\.)backbone\.(name|mean|std|available_levels)$")  # follow the backbone axis


def _flatten(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        flat: dict[str, object] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


def load_runs(sweep_dir: Path) -> list[dict]:
    """Every metrics.json under `sweep_dir`, with its run's config.yaml flattened under "config"."""
    runs = []
    for path in sorted(sweep_dir.rglob("metrics.json")):
        if ".incomplete" in path.relative_to(sweep_dir).parts:
            continue  # a failed or unfinished run's staging area
        record = json.loads(path.read_text())
        if not all(field in record for field in AXES):
            print(f"collect: skipped {path}: not an anomalib-lite run (no {', '.join(AXES)})", file=sys.stderr)
            continue
        record["run_dir"] = str(path.parent)
        config_path = path.parent / "config.yaml"
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
        record["config"] = {k: v for k, v in _flatten(config or {}).items() if not OUTPUT_SETTINGS.search(k)}
        runs.append(record)
    return runs


def varying_settings(runs: list[dict]) -> list[str]:
    """Config keys whose values differ between runs of the same table cell (method, dataset,
    category): the sweep's own axes; settings interpolated from another one (dataset.seed from
    seed) counted once; settings that only follow the category (its data root) left out."""
    by_method: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        by_method[(run["method"], run["dataset"], run["category"])].append(run)
    varying: dict[str, tuple] = {}
    for group in by_method.values():
        shared = set.intersection(*(set(run["config"]) for run in group))
        for key in sorted(shared):
            values = tuple(run["config"][key] for run in group)
            if len(set(map(str, values))) > 1 and key.split(".")[-1] not in AXES and not BACKBONE.search(key):
                varying[key] = varying.get(key, ()) + values
    # One column per distinct pattern: the shortest name among keys that always move together.
    chosen: dict[tuple, str] = {}
    for key in sorted(varying, key=lambda k: (k.count("."), len(k), k)):
        chosen.setdefault(varying[key], key)
    return sorted(chosen.values())


def short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends with."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for size in range(1, len(parts) + 1):
            suffix = ".".join(parts[-size:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        names[key] = suffix
    return names


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _field(run: dict, field: str) -> object:
    return run[field] if field in run else run.get("config", {}).get(field)


def row_keys(runs: list[dict], rows: list[str] | None = None, aggregate: bool = False) -> list[str]:
    """One table row name per run: method (and backbone when several), then the settings that vary
    (or the `rows` fields); the run folder is added where two runs would still share a cell,
    unless they are to be aggregated."""
    several_backbones = len({r.get("backbone") for r in runs}) > 1
    settings = varying_settings(runs) if rows is None else []
    names = short_names(settings)

    def key(run: dict) -> str:
        if rows:
            return " ".join(f"{field}={_field(run, field)}" if field != "method" else str(run["method"]) for field in rows)
        head = f"{run['method']} ({run['backbone']})" if several_backbones else str(run["method"])
        present = [f"{names[k]}={run['config'][k]}" for k in settings if k in run["config"]]
        return " ".join([head, *present])

    keys = [key(run) for run in runs]
    if aggregate:
        return keys
    seen = defaultdict(list)
    for index, (name, run) in enumerate(zip(keys, runs)):
        seen[(name, run.get("category"))].append(index)
    for indices in seen.values():
        if len(indices) > 1:
            for index in indices:
                keys[index] += f" [{Path(runs[index]['run_dir']).name}]"
    return keys


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def markdown_table(runs: list[dict], metric: str, rows: list[str] | None = None, aggregate: bool = False) -> str:
    """Rows: one per configuration (see `row_keys`); columns: categories, then the mean. With
    `aggregate`, a cell holding several runs shows mean +- standard deviation (n) and counts as its mean."""
    categories = sorted({r["category"] for r in runs})
    cells: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for key, run in zip(row_keys(runs, rows, aggregate), runs):
        if run.get(metric) is not None:
            cells[key][run["category"]].append(run[metric])
        else:
            cells[key].setdefault(run["category"], [])

    def value(key: str, category: str) -> float | None:
        present = cells[key].get(category) or []
        return _mean_std(present)[0] if present else None

    def text(key: str, category: str) -> str:
        present = cells[key].get(category) or []
        if len(present) > 1:
            mean, std = _mean_std(present)
            return f"{mean:.3f} ± {std:.3f} ({len(present)})"
        return _fmt(present[0] if present else None)

    lines = [f"| {metric} | " + " | ".join(categories) + " | mean |", "|---" * (len(categories) + 2) + "|"]
    for key in sorted(cells):
        present = [v for v in (value(key, c) for c in categories) if v is not None]
        mean = sum(present) / len(present) if present else None
        lines.append(f"| {key} | " + " | ".join(text(key, c) for c in categories) + f" | {_fmt(mean)} |")
    # The mean row: every row's mean per category.
    column_means = []
    for category in categories:
        present = [v for v in (value(k, category) for k in cells) if v is not None]
        column_means.append(sum(present) / len(present) if present else None)
    present = [v for v in column_means if v is not None]
    lines.append("| mean | " + " | ".join(_fmt(v) for v in column_means) + f" | {_fmt(sum(present) / len(present) if present else None)} |")
    return "\n".join(lines)


def write_csv(runs: list[dict], path: Path) -> None:
    """Every run's row: the fixed columns, then one column per varying setting."""
    settings = varying_settings(runs)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*COLUMNS, *settings], extrasaction="ignore")
        writer.writeheader()
        for run in runs:
            writer.writerow({**run, **{k: run["config"].get(k) for k in settings}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--csv", type=Path, default=None, help="CSV output (default: <sweep_dir>/results.csv)")
    parser.add_argument("--metrics", nargs="+", default=["image_auroc", "pixel_auroc", "pixel_aupro"])
    parser.add_argument("--rows", nargs="+", default=None, help="metrics.json fields that name a row")
    parser.add_argument("--aggregate", action="store_true", help="runs sharing a row and category: mean +- std (n)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"collect: error: not a folder: {args.sweep_dir}", file=sys.stderr)
        return 2
    runs = load_runs(args.sweep_dir)
    status = sweep_status(args.sweep_dir)
    if not runs:
        print(f"collect: error: no metrics.json under {args.sweep_dir}", file=sys.stderr)
        for line in status.summary_lines()[1:]:
            print(f"collect: {line}", file=sys.stderr)
        return 2
    for metric in args.metrics:
        print(markdown_table(runs, metric, args.rows, args.aggregate) + "\n")
    csv_path = args.csv or args.sweep_dir / "results.csv"
    owned = OwnedFiles(csv_path.parent, COLLECT_RECORD)
    if csv_path.exists() and csv_path.name not in (owned.read() or []):
        print(f"collect: error: {csv_path} exists and was not written by anomalib-lite-collect: pass --csv another file",
              file=sys.stderr)
        return 2
    owned.write(sorted({*(owned.read() or []), csv_path.name}))
    write_csv(runs, csv_path)
    print(f"{len(runs)} runs -> {csv_path}")
    if status.failed or status.missing:
        print(f"{len(status.failed)} failed and {len(status.missing)} never ran:")
        print("\n".join(f"  {line}" for line in status.summary_lines()[1:]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
