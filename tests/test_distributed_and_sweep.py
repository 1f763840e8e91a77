"""Runs through the real command: 2-process CPU DDP equals one process; -m sweeps and collect.py."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_tiny_args, run_cli

from anomalib_lite.engine.checkpoint import read_checkpoint


def _bank(run_dir: Path) -> torch.Tensor:
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "model.ckpt")
    return checkpoint["state_dict"]["model.memory_bank"]


def test_ddp_cpu_matches_single_process(tmp_path: Path, cache_dir: Path) -> None:
    # 9 fitted images over 2 ranks: the sampler pads one rank, which must not leak into the bank.
    common = [*cli_tiny_args(cache_dir), "dataset.category=stripes", "dataset.num_train=11", "dataset.val_ratio=0.2"]
    single = run_cli(*common, f"hydra.run.dir={tmp_path / 'single'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    # Python's own warning filters (the suite's PYTHONWARNINGS=ignore off): a clean DDP run prints no warning.
    ddp = run_cli(*common, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path, env={"PYTHONWARNINGS": ""})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert not ddp.stderr.strip(), ddp.stderr[-3000:]

    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp_metrics["world_size"] == 2 and single_metrics["world_size"] == 1
    # Same patches picked in the same order; values agree up to the float rounding of convolutions
    # run on other batch compositions (each rank sees half of every batch).
    single_bank, ddp_bank = _bank(tmp_path / "single"), _bank(tmp_path / "ddp")
    assert single_bank.shape == ddp_bank.shape
    torch.testing.assert_close(ddp_bank, single_bank, rtol=1e-4, atol=1e-4)
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max", "pixel_f1max", "image_threshold"):
        assert ddp_metrics[key] == pytest.approx(single_metrics[key], rel=1e-4, abs=1e-5), key
    assert ddp_metrics["num_test_images"] == single_metrics["num_test_images"]
    # Rank 0 writes every rank's predictions, each with its image path.
    rows = {name: list(csv.DictReader((tmp_path / name / "predictions.csv").open())) for name in ("single", "ddp")}
    assert len(rows["ddp"]) == ddp_metrics["num_test_images"]
    assert [r["image_path"] for r in rows["ddp"]] == [r["image_path"] for r in rows["single"]]
    assert all(r["image_path"] for r in rows["ddp"])


def test_trained_method_under_ddp_cpu(tmp_path: Path, cache_dir: Path) -> None:
    """CFLOW (per-level fiber steps leave the other levels' flows unused) trains under DDP;
    the best-epoch checkpoint and the test metrics come out as in a single process."""
    result = run_cli(
        *cli_tiny_args(cache_dir), "method=cflow", "method.epochs=2", "trainer=ddp_cpu", "dataset.batch_size=4",
        f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["best_epoch"] in (1, 2)
    assert (tmp_path / "ddp" / "checkpoints" / "best_epoch.ckpt").is_file()
    assert metrics["num_test_images"] == 8 + 4 * 4 and 0 <= metrics["pixel_aupro"] <= 1


def test_multirun_sweep_and_collect(tmp_path: Path, cache_dir: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m", "method=patchcore,padim", "dataset.category=stripes,disc", *cli_tiny_args(cache_dir),
        f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics_files = sorted(sweep_dir.rglob("metrics.json"))
    assert len(metrics_files) == 4
    combos = {(json.loads(p.read_text())["method"], json.loads(p.read_text())["category"]) for p in metrics_files}
    assert combos == {("patchcore", "stripes"), ("patchcore", "disc"), ("padim", "stripes"), ("padim", "disc")}

    collected = subprocess.run(
        [sys.executable, "-m", "anomalib_lite.collect", str(sweep_dir)],
        capture_output=True, text=True, check=True,
    )
    table = collected.stdout
    assert "| image_auroc | disc | stripes | mean |" in table
    assert "| patchcore |" in table and "| padim |" in table and "| mean |" in table
    csv_lines = (sweep_dir / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("method,backbone,dataset,category")


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_a_two_job_sweep_through_a_launcher(launcher: str, tmp_path: Path, cache_dir: Path) -> None:
    """The launchers the README promises: joblib (local processes) and submitit_local, which runs
    the same submitit code path as hydra/launcher=submitit_slurm on this machine."""
    sweep_dir = tmp_path / "sweep"
    settings = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=10"]
    result = run_cli(
        "-m", f"hydra/launcher={launcher}", *settings, "method=patchcore,padim", "dataset.category=disc",
        *cli_tiny_args(cache_dir), f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(sweep_dir.rglob("metrics.json"))
    assert len(written) == 2 and written[0].parent != written[1].parent  # each job its own run dir
    assert {json.loads(p.read_text())["method"] for p in written} == {"patchcore", "padim"}
    assert all(json.loads(p.read_text())["image_auroc"] is not None for p in written)


def test_optuna_search_runs_trials_and_reports_the_best(tmp_path: Path, cache_dir: Path) -> None:
    sweep_dir = tmp_path / "search"
    result = run_cli(
        "hparams_search=patchcore_optuna", "hydra.sweeper.n_trials=2", "dataset.category=disc",
        *cli_tiny_args(cache_dir), f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(sweep_dir.rglob("metrics.json"))) == 2
    best = (sweep_dir / "optimization_results.yaml").read_text()
    assert "best_params" in best and "best_value" in best


def test_embedding_search_tries_each_candidate_and_keeps_the_validation_winner(tmp_path: Path, cache_dir: Path) -> None:
    """hparams_search=patchcore_embedding: one trial per embedding (a grid, not a draw that may
    repeat one), and the reported best is the trial with the higher held-out validation metric."""
    import yaml

    sweep_dir = tmp_path / "search"
    result = run_cli(
        "hparams_search=patchcore_embedding", "dataset.category=disc", *cli_tiny_args(cache_dir), f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = {}
    for path in sweep_dir.rglob("metrics.json"):
        config = yaml.safe_load((path.parent / "config.yaml").read_text())
        trials[config["method"]["embedding"]] = json.loads(path.read_text())["val_synthetic_aupro"]
    assert set(trials) == {"per_level", "concatenation"}
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(trials.values()))
    assert trials[best["best_params"]["method.embedding"]] == pytest.approx(max(trials.values()))
