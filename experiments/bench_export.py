#!/usr/bin/env python
"""Speed of a run's model in eager PyTorch and in each exported format, on this machine's CPU
(issue 44, acceptance 3):

    python experiments/bench_export.py RUN [RUN ...] --exports DIR [--batches 1 32] [--repeats 20 3]

Each (run, runtime, batch) is timed in a process of its own (one runtime's threads and caches
never meet another's): uint8 images at the run's resize size (the artefact resizes and crops them
to the model's input, as the eager module does), `warm-up` calls, then `repeats` timed calls; the
median call gives the latency per image and the images per second. The artefacts are those
`experiments/export_parity.py` wrote in DIR/<run>/<format> (a missing one is exported). Each
process also reports its scores' largest difference from the eager module's on the same images.
Runtimes at their defaults on this machine's cores (torch: its intra-op threads; ONNX Runtime and
OpenVINO: theirs), OpenVINO at f32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

RUNTIMES = ("eager", "torchscript", "onnx", "openvino")
WARM_UP = 2


def images_for(run: Path, batch: int) -> np.ndarray:
    size = yaml.safe_load((run / "config.yaml").read_text())["dataset"]["image_size"]  # before the crop
    height, width = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(0).integers(0, 256, (batch, 3, height, width), dtype=np.uint8)


def load(runtime: str, run: Path, exports: Path):  # noqa: ANN201 - a callable of the runtime
    """uint8 images -> scores, with the runtime alone."""
    if runtime == "eager":
        import torch

        from anomalib_lite import deploy
        from anomalib_lite.engine.checkpoint import load_model

        inference = deploy.inference_model(load_model(run))

        def eager(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return inference(torch.from_numpy(images))[0].numpy()

        return eager
    from anomalib_lite.serve import ExportedModel

    model = ExportedModel(exports / run.name / runtime)
    return lambda images: model(images)["pred_score"]


def time_one(runtime: str, run: Path, exports: Path, batch: int, repeats: int) -> dict:
    """In this process: the median call of `runtime` on a batch, and its scores."""
    score = load(runtime, run, exports)
    images = images_for(run, batch)
    for _ in range(WARM_UP):
        scores = score(images)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        score(images)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {"median_s": median, "latency_ms": 1000 * median / batch, "images_per_s": batch / median, "scores": np.asarray(scores).tolist()}


def ensure_export(run: Path, runtime: str, exports: Path) -> None:
    """The run's artefact in `runtime`'s format: exported again unless it is from the run's checkpoint."""
    if runtime == "eager":
        return
    from anomalib_lite import deploy
    from anomalib_lite.engine.checkpoint import find_checkpoint

    metadata = exports / run.name / runtime / "metadata.json"
    if metadata.is_file() and json.loads(metadata.read_text()).get("checkpoint_sha256") == deploy.file_sha256(find_checkpoint(run)):
        return
    deploy.export(run, runtime, exports / run.name / runtime, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--exports", type=Path, required=True)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--repeats", nargs="+", type=int, default=[20, 3], help="timed calls per batch size, in order")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--one", nargs=4, metavar=("RUNTIME", "RUN", "BATCH", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child process: one measurement, printed as json
        runtime, run, batch, repeats = args.one
        print(json.dumps(time_one(runtime, Path(run), args.exports, int(batch), int(repeats))))
        return 0
    if not args.runs:
        parser.error("give at least one run folder")
    rows = []
    for run in args.runs:
        for runtime in args.runtimes:
            ensure_export(run, runtime, args.exports)
        for batch, repeats in zip(args.batches, args.repeats):
            results = {}
            for runtime in args.runtimes:
                child = subprocess.run(
                    [sys.executable, __file__, "--exports", str(args.exports), "--one", runtime, str(run), str(batch), str(repeats)],
                    capture_output=True, text=True,
                )
                if child.returncode != 0:
                    print(f"{run.name} {runtime} batch {batch}: failed\n{child.stderr[-2000:]}", flush=True)
                    continue
                results[runtime] = json.loads(child.stdout.strip().splitlines()[-1])
                print(f"{run.name} {runtime} batch {batch}: {results[runtime]['latency_ms']:.1f} ms/image, "
                      f"{results[runtime]['images_per_s']:.1f} images/s", flush=True)
            eager = np.asarray(results["eager"]["scores"]) if "eager" in results else None
            for runtime, result in results.items():
                difference = float(np.abs(np.asarray(result["scores"]) - eager).max()) if eager is not None else float("nan")
                rows.append((run.name, batch, runtime, result, difference))
    print("\n| run | batch | runtime | ms per image | images / s | x eager | largest score difference from eager |")
    print("|---|---|---|---|---|---|---|")
    eager_rates = {(name, batch): result["images_per_s"] for name, batch, runtime, result, _ in rows if runtime == "eager"}
    for name, batch, runtime, result, difference in rows:
        speedup = result["images_per_s"] / eager_rates[(name, batch)] if (name, batch) in eager_rates else float("nan")
        print(f"| {name} | {batch} | {runtime} | {result['latency_ms']:.1f} | {result['images_per_s']:.1f} | {speedup:.2f} | {difference:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
