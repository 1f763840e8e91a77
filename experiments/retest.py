#!/usr/bin/env python
"""Test a finished run's checkpoint again with some of the method's test-time knobs changed,
without fitting again (PatchCore's coreset on magnetic_tile takes 20 minutes; its image-score
rule does not need it redone):

    python experiments/retest.py outputs/runs/<run> num_neighbors=9 [blur_sigma=8.0 ...]

Each `key=value` overrides one of the method's saved arguments (parsed as YAML). The thresholds
are fitted again on the run's validation images, as a run does; then the test set is scored and
metrics.json written to `<run>_retest_<overrides>` (heatmaps are not exported).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import lightning as L
import yaml
from omegaconf import OmegaConf

from anomalib_lite.callbacks import AnomalyMetrics
from anomalib_lite.engine.checkpoint import load_model, run_datamodule
from anomalib_lite.errors import UserInputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run's output dir (config.yaml, checkpoints/model.ckpt)")
    parser.add_argument("overrides", nargs="*", help="key=value: a method argument to change")
    args = parser.parse_args(argv)

    cfg = OmegaConf.load(args.run_dir / "config.yaml")
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"expected key=value, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    try:
        module = load_model(args.run_dir, overrides=overrides)  # read as data: no code runs from the file
        datamodule = run_datamodule(args.run_dir)
    except UserInputError as error:
        print(f"retest: error: {error}", file=sys.stderr)
        return UserInputError.exit_code
    suffix = "_".join(f"{k}{v}" for k, v in overrides.items()) or "same"
    out = args.run_dir.parent / f"{args.run_dir.name}_retest_{suffix}"
    out.mkdir(parents=True, exist_ok=True)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    metrics = AnomalyMetrics(fpr_limit=cfg.callbacks.metrics.fpr_limit, predictions_file=str(out / "predictions.csv"))
    accelerator = cfg.trainer.get("accelerator", "cpu")  # where the run ran (a GPU run retests on its GPU)
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, callbacks=[metrics], enable_checkpointing=False)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    start = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start
    results = metrics.report() | module.validation_results | {
        "test_seconds": round(test_seconds, 2),
        "retest_of": str(args.run_dir),
        "overrides": overrides,
    }
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
