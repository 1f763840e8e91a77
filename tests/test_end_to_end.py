"""One fit + validate + test per method on tiny synthetic data, through the real config and run()."""

from __future__ import annotations

import csv
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


# Small but real: enough epochs on the tiny data that every flow localises the synthetic defects.
TRAINED = {
    "fastflow": ["method.epochs=6"],
    "cflow": ["method.epochs=4"],
    "cs_flow": ["method.epochs=4", "method.hidden_channels=32"],
    "ss_flow": ["method.epochs=4", "method.flow_steps=4"],
}


@pytest.mark.parametrize("method", list(TRAINED))
def test_trained_methods_fit_and_test_on_synthetic(method: str, make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(f"method={method}", "dataset.category=disc", *TRAINED[method])
    results = run(cfg)
    out = tmp_path / "run"
    written = json.loads((out / "metrics.json").read_text())
    assert REQUIRED_KEYS <= set(written) and written["method"] == method
    assert all(0 <= written[key] <= 1 for key in METRIC_KEYS)
    assert written["pixel_auroc"] > 0.75, "the method does not localise the synthetic defects"
    assert written["epochs"] == cfg.method.epochs and 1 <= written["best_epoch"] <= cfg.method.epochs
    assert results["best_epoch"] == written["best_epoch"]
    heatmaps = sorted((out / "heatmaps").rglob("*.png"))
    assert len(heatmaps) == 10
    module_class = get_class(cfg.method._target_)
    fresh = module_class.load_from_checkpoint(out / "checkpoints" / "model.ckpt", map_location="cpu", weights_only=False)
    output = fresh.eval()(torch.rand(2, 3, 96, 96))
    assert output.pred_score.shape == (2,) and output.anomaly_map.shape == (2, 96, 96)


def test_trained_method_keeps_its_best_epoch_by_validation_loss(make_cfg, tmp_path: Path) -> None:
    """The tested weights are those of the epoch with the lowest val_loss, not the last epoch's.

    A learning rate this high makes the loss jump around, so the best epoch is rarely the last;
    whichever it is, the logged val_loss curve decides it and the saved model holds its weights.
    """
    cfg = make_cfg("method=fastflow", "method.epochs=5", "method.learning_rate=0.05", "dataset.category=stripes")
    results = run(cfg)
    out = tmp_path / "run"
    log = next((out / "logs").rglob("metrics.csv"))
    val_losses: dict[int, float] = {}
    for row in csv.DictReader(log.open()):
        if row.get("val_loss"):
            val_losses[int(row["epoch"])] = float(row["val_loss"])
    # Epochs 0-4 from fitting; one more row from the run's final validation of the restored weights.
    assert sorted(val_losses) == [0, 1, 2, 3, 4, 5]
    final_validation = val_losses.pop(5)
    best = min(val_losses, key=val_losses.get)
    assert results["best_epoch"] == best + 1
    assert final_validation == pytest.approx(val_losses[best], rel=1e-5)
    best_weights = torch.load(out / "checkpoints" / "best_epoch.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    final_weights = torch.load(out / "checkpoints" / "model.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    flow_keys = [k for k in best_weights if k.startswith("model.flows.")]
    assert flow_keys and all(torch.equal(best_weights[k], final_weights[k]) for k in flow_keys)


def test_few_shot_run_fits_on_k_images(make_cfg, tmp_path: Path) -> None:
    results = run(make_cfg("method=patchcore", "dataset.num_shots=2", "dataset.category=disc"))
    assert results["num_train_images"] == 2
    state = torch.load(tmp_path / "run" / "checkpoints" / "model.ckpt", map_location="cpu", weights_only=False)
    # 96 px -> 12 x 12 level-2 patches per image, 2 images, coreset ratio 0.1.
    assert state["state_dict"]["model.memory_bank"].shape[0] == round(2 * 144 * 0.1)
