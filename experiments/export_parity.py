#!/usr/bin/env python
"""Does an exported model reproduce its run? Export finished runs, score their test sets with the
artefacts, compare with what the runs wrote (issue 44, acceptance 2):

    python experiments/export_parity.py RUN [RUN ...] --output DIR [--formats onnx openvino]

For each run and format: `anomalib-lite-export RUN --format F --output DIR/<run>/F`, then
`anomalib-lite-predict DIR/<run>/F <the run's test folder>`; its predictions.csv against the run's
(the largest |score difference|, the verdicts that changed). Then the test metrics: the artefact
scores the run's test images (their files' bytes, resized inside the artefact) and
`metrics.compute_metrics` takes its scores and maps with the run's masks, as the run's metrics
callback did; the same path with the trained module instead of the artefact is printed beside it,
so that a difference the resize makes (the files are read once by PIL in the run, here by the
artefact's own resize) shows apart from one the export makes. A markdown table at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from anomalib_lite import deploy, predict
from anomalib_lite.engine.checkpoint import load_model, run_datamodule
from anomalib_lite.metrics import compute_metrics
from anomalib_lite.serve import ExportedModel, as_uint8

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max", "image_ap", "pixel_f1max", "pixel_ap")
BATCH = 8


def read_predictions(path: Path) -> dict[str, dict[str, str]]:
    return {row["image_path"]: row for row in csv.DictReader(path.open())}


def test_set(run: Path) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    """The run's test images (paths), labels and masks as its metrics callback saw them."""
    datamodule = run_datamodule(run)
    datamodule.setup("test")
    dataset = datamodule.test_dataloader().dataset
    masks = torch.stack([dataset.load_mask(i, datamodule.dataset_resize.output_size) for i in range(len(dataset))])
    labels = torch.tensor([sample.label for sample in dataset.samples])
    return [sample.image_path for sample in dataset.samples], labels, masks


def score_files(score: Callable, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, maps) of the files, BATCH at a time, from `score(uint8 B x 3 x H x W) -> (scores, maps)`."""
    scores, maps = [], []
    for start in range(0, len(paths), BATCH):
        images = np.stack([as_uint8(path) for path in paths[start : start + BATCH]])
        batch_scores, batch_maps = score(images)
        scores.append(torch.as_tensor(batch_scores))
        maps.append(torch.as_tensor(batch_maps))
    return torch.cat(scores), torch.cat(maps)


def module_scorer(run: Path) -> Callable:
    inference = deploy.inference_model(load_model(run))

    def score(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            output = inference(torch.from_numpy(images))
        return output[0], output[1]

    return score


def artefact_scorer(folder: Path) -> Callable:
    model = ExportedModel(folder)

    def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = model(images)
        return outputs["pred_score"], outputs["anomaly_map"]

    return score


def metrics_of(scores: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, run: Path) -> dict:
    written = json.loads((run / "metrics.json").read_text())
    mask_size = masks.shape[-2:]
    if maps.shape[-2:] != mask_size:  # as the run's masks: at the model's input size
        raise SystemExit(f"{run}: maps {tuple(maps.shape[-2:])} and masks {tuple(mask_size)} differ in size")
    return compute_metrics(scores, labels, maps, masks > 0.5, fpr_limit=0.3, image_threshold=written["image_threshold"])


def compare(run: Path, format: str, output: Path) -> dict:
    folder = output / run.name / format
    start = time.perf_counter()
    deploy.export(run, format, folder, overwrite=True)
    export_seconds = time.perf_counter() - start
    expected = read_predictions(run / "predictions.csv")
    test_folder = Path(next(iter(expected))).parents[1]
    predicted_dir = output / run.name / f"{format}-predict"
    assert predict.main([str(folder), str(test_folder), "--output", str(predicted_dir), "--max-heatmaps", "4", "--overwrite"]) == 0
    predicted = read_predictions(predicted_dir / "predictions.csv")
    missing = set(expected) - set(predicted)
    if missing:
        raise SystemExit(f"{format}: predict gave no row for {len(missing)} of the run's test images")
    differences = [abs(float(predicted[p]["score"]) - float(expected[p]["score"])) for p in expected]
    scores = [float(expected[p]["score"]) for p in expected]
    changed = sum(predicted[p]["predicted_anomalous"] != expected[p]["predicted_anomalous"] for p in expected)
    paths, labels, masks = test_set(run)
    exported = metrics_of(*score_files(artefact_scorer(folder), paths), labels, masks, run)
    written = json.loads((run / "metrics.json").read_text())
    return {
        "export_seconds": export_seconds,
        "max_score_difference": max(differences),
        "score_range": max(scores) - min(scores),
        "verdicts_changed": changed,
        "images": len(expected),
        "metrics": exported,
        "metric_difference": max(abs(exported[k] - written[k]) for k in METRICS if written.get(k) is not None),
        "written": {k: written.get(k) for k in METRICS},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--formats", nargs="+", default=["onnx", "openvino"], choices=deploy.FORMATS)
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        paths, labels, masks = test_set(run)
        eager = metrics_of(*score_files(module_scorer(run), paths), labels, masks, run)
        written = json.loads((run / "metrics.json").read_text())
        eager_difference = max(abs(eager[k] - written[k]) for k in METRICS if written.get(k) is not None)
        print(f"{run.name}: the module from the files' bytes, metrics within {eager_difference:.1e} of metrics.json", flush=True)
        for format in args.formats:
            result = compare(run, format, args.output)
            print(f"{run.name} {format}: {json.dumps(result)}", flush=True)
            rows.append((run, format, result, eager_difference))
    print("\n| run | format | largest score difference (score range) | verdicts changed | image AUROC | pixel AUROC | AUPRO "
          "| largest metric difference: artefact / module (files' bytes) | export s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run, format, result, eager_difference in rows:
        m = result["metrics"]
        print(
            f"| {run.name} | {format} | {result['max_score_difference']:.2e} ({result['score_range']:.3g}) "
            f"| {result['verdicts_changed']} of {result['images']} | {m['image_auroc']:.6f} | {m['pixel_auroc']:.6f} "
            f"| {m['pixel_aupro']:.6f} | {result['metric_difference']:.1e} / {eager_difference:.1e} | {result['export_seconds']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
