"""anomalib-lite-collect on hand-made run folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import REPO

from anomalib_lite import collect


def _run(root: Path, name: str, **fields) -> None:
    (root / name).mkdir(parents=True)
    record = {"backbone": "tf_efficientnet_lite0", "dataset": "mvtec", "category": "bottle", **fields}
    (root / name / "metrics.json").write_text(json.dumps(record))


def test_few_shot_rows_and_means(tmp_path: Path, capsys) -> None:
    for k, score in ((1, 0.5), (2, 0.7)):
        _run(tmp_path, f"pc{k}", method="patchcore", num_shots=k, image_auroc=score)
        _run(tmp_path, f"ss{k}", method="ss_flow", num_shots=k, image_auroc=score + 0.2)
    assert collect.main([str(tmp_path), "--metrics", "image_auroc", "--rows", "method", "num_shots"]) == 0
    table = capsys.readouterr().out
    assert "| patchcore num_shots=1 | 0.500 | 0.500 |" in table
    assert "| ss_flow num_shots=2 | 0.900 | 0.900 |" in table
    assert "| mean | 0.700 | 0.700 |" in table  # (0.5 + 0.7 + 0.7 + 0.9) / 4
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("method,backbone,dataset,category,seed,num_shots") and len(rows) == 5


def test_aggregate_gives_mean_and_std_over_seeds(tmp_path: Path, capsys) -> None:
    for seed, score in enumerate((0.6, 0.8, 0.7)):
        _run(tmp_path, f"r{seed}", method="regad", num_shots=2, seed=seed, image_auroc=score)
    _run(tmp_path, "p0", method="patchcore", num_shots=2, seed=0, image_auroc=0.9)
    assert collect.main([str(tmp_path), "--metrics", "image_auroc", "--rows", "method", "num_shots", "--aggregate"]) == 0
    table = capsys.readouterr().out
    assert "| regad num_shots=2 | 0.700 ± 0.100 (3) | 0.700 |" in table
    assert "| patchcore num_shots=2 | 0.900 | 0.900 |" in table
    assert "| mean | 0.800 | 0.800 |" in table  # the rows' means: (0.7 + 0.9) / 2


def test_selection_study_on_hand_made_trials(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("selection", REPO / "experiments" / "selection_study.py")
    selection = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(selection)
    # Validation AUPRO ranks the trials 3 > 1 > 2 > 0; test AUPRO ranks them 1 > 3 > 2 > 0.
    for trial, (val, test) in enumerate([(0.1, 0.50), (0.7, 0.90), (0.4, 0.60), (0.9, 0.80)]):
        _run(tmp_path, f"trial{trial}", method="patchcore", val_synthetic_aupro=val, pixel_aupro=test,
             val_synthetic_image_auroc=val, image_auroc=1 - test, val_synthetic_pixel_auroc=val, pixel_auroc=test)
    assert selection.main([str(tmp_path)]) == 0
    result = json.loads((tmp_path / "selection.json").read_text())
    aupro = result["pairs"]["val_synthetic_aupro ~ pixel_aupro"]
    assert aupro["spearman"] == 0.8  # rank differences (0, 1, 0, -1): 1 - 6 * 2 / (4 * 15)
    assert aupro["pixel_aupro of the trial val_synthetic_aupro picks"] == 0.80
    assert aupro["best pixel_aupro"] == 0.90 and aupro["median pixel_aupro"] == 0.70
    assert result["pairs"]["val_synthetic_image_auroc ~ image_auroc"]["spearman"] == -0.8
    assert result["picked_run"].endswith("trial3")


def test_selection_study_says_when_a_metric_is_constant(tmp_path: Path) -> None:
    """A validation metric equal in every trial ranks nothing: no correlation is reported for it."""
    spec = importlib.util.spec_from_file_location("selection", REPO / "experiments" / "selection_study.py")
    selection = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(selection)
    for trial, (val, test) in enumerate([(0.1, 0.50), (0.7, 0.90), (0.4, 0.60)]):
        _run(tmp_path, f"trial{trial}", method="patchcore", val_synthetic_aupro=val, pixel_aupro=test,
             val_synthetic_image_auroc=1.0, image_auroc=0.99, val_synthetic_pixel_auroc=val, pixel_auroc=test)
    assert selection.main([str(tmp_path)]) == 0
    pairs = json.loads((tmp_path / "selection.json").read_text())["pairs"]
    assert pairs["val_synthetic_image_auroc ~ image_auroc"]["spearman"].startswith("undefined")
    assert pairs["val_synthetic_aupro ~ pixel_aupro"]["spearman"] == 1.0


def _configured_run(root: Path, name: str, image_size: int, seed: int, score: float, method: str = "patchcore") -> None:
    """A run folder as train.py leaves it: metrics.json beside the resolved config.yaml."""
    _run(root, name, method=method, image_auroc=score, seed=seed)
    config = (
        f"seed: {seed}\npaths:\n  output_dir: {root / name}\n"
        f"method:\n  _target_: x.{method}\n  coreset_sampler:\n    ratio: 0.1\n    seed: {seed}\n"
        f"dataset:\n  category: bottle\n  image_size: {image_size}\n  seed: {seed}\n"
        f"trainer:\n  default_root_dir: {root / name}\n"
    )
    (root / name / "config.yaml").write_text(config)


def test_collect_keeps_every_run_of_a_sweep_over_a_setting(tmp_path: Path, capsys) -> None:
    """A sweep over image size and seed (one category): four rows, each named by the settings that
    vary (seed counted once though three keys follow it; output paths never count)."""
    for index, (size, seed) in enumerate([(128, 0), (128, 1), (256, 0), (256, 1)]):
        _configured_run(tmp_path, f"{index}", size, seed, score=0.5 + index / 10)
    (tmp_path / "4" / ".incomplete").mkdir(parents=True)  # a failed run's staging area is no run
    (tmp_path / "4" / ".incomplete" / "metrics.json").write_text("{}")
    assert collect.main([str(tmp_path), "--metrics", "image_auroc"]) == 0
    table = capsys.readouterr().out
    for size, seed, score in [(128, 0, 0.5), (128, 1, 0.6), (256, 0, 0.7), (256, 1, 0.8)]:
        assert f"| patchcore image_size={size} seed={seed} | {score:.3f} | {score:.3f} |" in table
    assert table.count("| patchcore") == 4
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].endswith(",run_dir,dataset.image_size,seed")
    assert rows[3].endswith(",256,0")


def test_collect_tells_identical_runs_apart_by_folder(tmp_path: Path, capsys) -> None:
    """Two runs of the same configuration share no cell: the folder names them."""
    _configured_run(tmp_path, "first", 128, 0, score=0.5)
    _configured_run(tmp_path, "again", 128, 0, score=0.9)
    assert collect.main([str(tmp_path), "--metrics", "image_auroc"]) == 0
    table = capsys.readouterr().out
    assert "| patchcore [first] | 0.500 |" in table and "| patchcore [again] | 0.900 |" in table
