#!/usr/bin/env python
"""Time `anomalib-lite smoke=<method>` for every method, each from an empty cache (the synthetic
data and any teacher or registration network are made anew), one after another: the README's
quick-try table.

    python experiments/quick_try_times.py [--methods stfpm padim ...] [--out outputs/quick_try]

Prints a markdown table (method, synthetic category, wall seconds including start-up, image / pixel AUROC, AUPRO) and
writes it to <out>/quick_try.md; the runs' folders stay under <out>/runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "anomalib_lite" / "conf"
LIMIT_SECONDS = 120  # the quick try's bar


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=sorted(p.stem for p in (CONF / "smoke").glob("*.yaml")))
    parser.add_argument("--out", type=Path, default=Path("outputs/quick_try"))
    args = parser.parse_args(argv)
    rows = ["| method | category | seconds | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|---|"]
    slow = []
    for method in args.methods:
        run_dir = args.out / "runs" / method  # an earlier measurement's run is replaced by the run's own rules
        cache = Path(tempfile.mkdtemp(prefix=f"quick_try_{method}_"))
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "anomalib_lite", f"smoke={method}", f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}", "overwrite=true"],
            capture_output=True, text=True,
        )
        seconds = time.perf_counter() - start
        shutil.rmtree(cache, ignore_errors=True)  # the temporary folder made above
        if result.returncode != 0:
            print(f"{method}: failed ({result.returncode}): {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            rows.append(f"| {method} | | failed | | | |")
            continue
        metrics = json.loads((run_dir / "metrics.json").read_text())
        scores = [metrics.get(key) for key in ("image_auroc", "pixel_auroc", "pixel_aupro")]
        rows.append(f"| {method} | {metrics['category']} | {seconds:.0f} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in scores) + " |")
        print(rows[-1], flush=True)
        if seconds > LIMIT_SECONDS:
            slow.append(method)
    table = "\n".join(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quick_try.md").write_text(table + "\n")
    print(table)
    if slow:
        print(f"over {LIMIT_SECONDS} s: {', '.join(slow)}", file=sys.stderr)
    return 1 if slow or "failed" in table else 0


if __name__ == "__main__":
    sys.exit(main())
