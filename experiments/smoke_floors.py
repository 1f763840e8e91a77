#!/usr/bin/env python
"""The end-to-end test's data, many seeds: what each method's quick try reaches, to set its floors.

    python experiments/smoke_floors.py --output outputs/bench/floors [--seeds 0 1 2 3 4] [--methods padim ...]
        [--set trainer.max_epochs=8 ...]     # trying other quick-try settings (into another --output)

Every method runs its `smoke/<method>.yaml` (the synthetic category `disc`, or `stripes` where
its smoke file says so), as
`tests/test_end_to_end.py` fits it, once per seed. One json line per (method, seed) in
OUTPUT/results.jsonl (a finished pair is not run again: the command resumes), two worker
processes of one torch thread each (as the suite's workers). Then per method: the lowest and
highest image AUROC, pixel AUROC and AUPRO over the seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from anomalib_lite.config import CONFIG_DIR

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
# The end-to-end test's outputs: two heatmaps per type, no progress bar.
TEST_OVERRIDES = ["callbacks.heatmaps.max_per_type=2", "~callbacks.progress"]


def methods() -> list[str]:
    return sorted(path.stem for path in (Path(CONFIG_DIR) / "method").glob("*.yaml"))


def done(results: Path) -> set[tuple[str, int]]:
    if not results.is_file():
        return set()
    return {(row["method"], row["seed"]) for row in map(json.loads, results.read_text().splitlines()) if row}


def fit(method: str, seed: int, output: Path, extra: list[str]) -> dict:
    """One quick try, in this process, as the end-to-end test composes it."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from anomalib_lite.train import run

    torch.set_num_threads(1)
    run_dir = output / "runs" / f"{method}_seed{seed}"
    overrides = [f"smoke={method}", f"seed={seed}", *TEST_OVERRIDES, f"paths.cache_dir={output / 'cache'}", f"paths.output_dir={run_dir}", "overwrite=true", *extra]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    start = time.perf_counter()
    results = run(cfg)
    return {"method": method, "seed": seed, **{k: results[k] for k in METRICS}, "seconds": round(time.perf_counter() - start, 1)}


def work(jobs: list[tuple[str, int]], output: Path, extra: list[str]) -> None:
    logging.disable(logging.INFO)
    results = output / "results.jsonl"
    for method, seed in jobs:
        if (method, seed) in done(results):
            continue
        row = fit(method, seed, output, extra)
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{method} seed {seed}: " + ", ".join(f"{k} {row[k]:.4f}" for k in METRICS) + f" ({row['seconds']} s)", flush=True)


def summary(results: Path) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line]
    print("\n| method | seeds | image AUROC min / max | pixel AUROC min / max | AUPRO min / max | s per fit |")
    print("|---|---|---|---|---|---|")
    for method in sorted({row["method"] for row in rows}):
        mine = [row for row in rows if row["method"] == method]
        cells = [f"{min(r[k] for r in mine):.4f} / {max(r[k] for r in mine):.4f}" for k in METRICS]
        seconds = sum(r["seconds"] for r in mine) / len(mine)
        print(f"| {method} | {len(mine)} | " + " | ".join(cells) + f" | {seconds:.0f} |")


def floor(values: list[float]) -> float:
    """The lowest seed minus max(0.05, half the seeds' range), rounded down to 0.01 (FLOORS.md says why)."""
    import math

    margin = max(0.05, (max(values) - min(values)) / 2)
    return max(0.0, math.floor((min(values) - margin) * 100 + 1e-9) / 100)


def print_floors(results: Path) -> None:
    """The FLOORS table of tests/test_end_to_end.py, from the study (to paste, not to retype)."""
    rows = [json.loads(line) for line in results.read_text().splitlines() if line]
    print("\nFLOORS = {")
    for method in sorted({row["method"] for row in rows}):
        mine = [row for row in rows if row["method"] == method]
        print(f'    "{method}": (' + ", ".join(f"{floor([r[k] for r in mine]):.2f}" for k in METRICS) + "),")
    print("}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", nargs="+", default=[], metavar="OVERRIDE", help="extra config overrides for every fit")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.methods or methods()
    args.output.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        # Jobs dealt out by (method, seed), so that one method's seeds also run side by side.
        jobs = [(method, seed) for method in names for seed in args.seeds]
        work(jobs[args.worker :: args.workers], args.output, args.set)
        return 0
    base = [sys.executable, __file__, "--output", str(args.output), "--seeds", *map(str, args.seeds), "--methods", *names]
    if args.set:
        base += ["--set", *args.set]
    children = [subprocess.Popen([*base, "--workers", str(args.workers), "--worker", str(i)]) for i in range(args.workers)]
    codes = [child.wait() for child in children]
    summary(args.output / "results.jsonl")
    print_floors(args.output / "results.jsonl")
    return max(codes)


if __name__ == "__main__":
    raise SystemExit(main())
