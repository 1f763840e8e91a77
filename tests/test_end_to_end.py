"""One fit + validate + test per method on tiny synthetic data, through the real config and run()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class

from anomalib_lite.train import METRIC_KEYS, run

REQUIRED_KEYS = {*METRIC_KEYS, "fit_seconds", "test_seconds", "method", "backbone", "dataset", "category"}


@pytest.mark.parametrize("method", ["patchcore", "padim"])
def test_fit_and_test_on_synthetic(method: str, make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(f"method={method}", "dataset.category=disc")
    results = run(cfg)
    out = tmp_path / "run"
    written = json.loads((out / "metrics.json").read_text())
    assert REQUIRED_KEYS <= set(written)
    assert written["method"] == method and written["dataset"] == "synthetic" and written["category"] == "disc"
    # The synthetic defects are obvious: a working method separates them clearly.
    assert written["image_auroc"] > 0.8 and written["pixel_auroc"] > 0.85 and written["pixel_aupro"] > 0.5
    assert results["image_auroc"] == written["image_auroc"]
    assert (out / "config.yaml").is_file() and (out / "predictions.csv").is_file()
    heatmaps = sorted((out / "heatmaps").rglob("*.png"))
    # Two per type (the cap), every type represented.
    assert {p.parent.name for p in heatmaps} == {"good", "scratch", "hole", "stain", "missing"} and len(heatmaps) == 10
    assert list((out / "logs").rglob("metrics.csv")), "the CSV logger got the metrics"

    # The checkpoint alone restores the fitted model (memory bank / Gaussians, thresholds).
    module_class = get_class(cfg.method._target_)
    fresh = module_class.load_from_checkpoint(out / "checkpoints" / "model.ckpt", map_location="cpu", weights_only=False)
    fresh.eval()
    assert float(fresh.image_threshold) == pytest.approx(written["image_threshold"])
    images = torch.rand(2, 3, 96, 96)
    output = fresh(images)
    assert output.pred_score.shape == (2,) and output.anomaly_map.shape == (2, 96, 96)


def test_center_crop_and_coreset_ratio(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("dataset.category=weave", "dataset.image_size=96", "dataset.crop_size=64", "method.coreset_ratio=0.25")
    run(cfg)
    state = torch.load(tmp_path / "run" / "checkpoints" / "model.ckpt", map_location="cpu", weights_only=False)
    bank = state["state_dict"]["model.memory_bank"]
    # 64 px input -> 8 x 8 level-2 patches per image; 12 normal images, 20% held out -> 10 fitted.
    assert bank.shape[0] == round(10 * 64 * 0.25)
