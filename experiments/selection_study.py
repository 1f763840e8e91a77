#!/usr/bin/env python
"""How well does the label-free validation metric choose? Read a hyperparameter sweep (e.g. the
12-trial Optuna PatchCore search) and compare, across its trials, each validation metric
(held-out normal images with synthetic anomalies) with the test metric it stands in for.

    python experiments/selection_study.py outputs/bench/selection/lite0_mvtec [--picked-by val_synthetic_aupro]

Prints per pair: Spearman's rank correlation over the trials, the test score of the trial the
validation metric picks (its maximum), and the best and the median test score of all trials.
Writes the same to <sweep dir>/selection.json. The test labels only evaluate the choice here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml
from scipy.stats import spearmanr

PAIRS = (
    ("val_synthetic_aupro", "pixel_aupro"),
    ("val_synthetic_image_auroc", "image_auroc"),
    ("val_synthetic_pixel_auroc", "pixel_auroc"),
)


def load_trials(sweep_dir: Path) -> list[dict]:
    trials = []
    for path in sorted(sweep_dir.rglob("metrics.json")):
        record = json.loads(path.read_text())
        overrides = path.parent / ".hydra" / "overrides.yaml"
        record["overrides"] = yaml.safe_load(overrides.read_text()) if overrides.is_file() else []
        record["run_dir"] = str(path.parent)
        trials.append(record)
    return trials


def study(trials: list[dict], picked_by: str) -> dict:
    picked = max(trials, key=lambda t: t[picked_by])
    result = {"trials": len(trials), "picked_by": picked_by, "picked_run": picked["run_dir"],
              "picked_overrides": picked["overrides"], "pairs": {}}
    for validation, test in PAIRS:
        rows = [t for t in trials if t.get(validation) is not None and t.get(test) is not None]
        tests = [t[test] for t in rows]
        own_pick = max(rows, key=lambda t: t[validation])
        validations = [t[validation] for t in rows]
        if len(set(validations)) > 1 and len(set(tests)) > 1:
            rho, p_value = (round(float(x), 4) for x in spearmanr(validations, tests))
        else:  # a metric that is the same in every trial ranks nothing (e.g. image AUROC 1.0 throughout)
            rho = p_value = "undefined (constant over the trials)"
        result["pairs"][f"{validation} ~ {test}"] = {
            "spearman": rho, "p_value": p_value,
            f"{test} of the trial {validation} picks": own_pick[test],
            f"{test} of the trial {picked_by} picks": picked[test],
            f"best {test}": max(tests), f"median {test}": statistics.median(tests), f"worst {test}": min(tests),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--picked-by", default="val_synthetic_aupro", help="the metric the sweep optimised")
    args = parser.parse_args(argv)
    trials = load_trials(args.sweep_dir)
    if len(trials) < 3:
        print(f"selection_study: error: {len(trials)} trials under {args.sweep_dir}, need at least 3", file=sys.stderr)
        return 2
    result = study(trials, args.picked_by)
    print(f"{result['trials']} trials; the sweep's choice ({args.picked_by}): {' '.join(result['picked_overrides'])}")
    for pair, values in result["pairs"].items():
        print(f"  {pair}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))
    print("  trials (" + ", ".join(f"{v} / {t}" for v, t in PAIRS) + "):")
    for trial in sorted(trials, key=lambda t: -t[args.picked_by]):
        scores = "  ".join(f"{trial[v]:.4f}/{trial[t]:.4f}" for v, t in PAIRS)
        print(f"    {scores}  {' '.join(trial['overrides'])}")
    (args.sweep_dir / "selection.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
