"""Every kind of bad input: one clear line naming the culprit, a non-zero exit, nothing overwritten."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_tiny_args, error_lines, run_cli, run_main
from PIL import Image

from anomalib_lite.cli import RANK_VARIABLES, precheck
from anomalib_lite.data import generate_category
from anomalib_lite.run_dir import LOCK, RUN_RECORD, STAGING, OwnedFiles


@pytest.fixture(scope="module")
def pristine_category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    return generate_category(root, "weave", image_size=64, num_train=6, num_test_good=2, num_test_per_defect=1)


@pytest.fixture
def mvtec_root(pristine_category: Path, tmp_path: Path) -> Path:
    """A writable copy, in MVTec layout, of a tiny synthetic category named 'part'."""
    root = tmp_path / "data"
    shutil.copytree(pristine_category, root / "part")
    return root


def _missing_category(root: Path) -> str:
    return "dataset.category=nosuchpart"


def _empty_train(root: Path) -> str:
    for image in (root / "part" / "train" / "good").iterdir():
        image.unlink()
    return "dataset.category=part"


def _missing_mask(root: Path) -> str:
    (root / "part" / "ground_truth" / "hole" / "000_mask.png").unlink()
    return "dataset.category=part"


def _mask_of_other_size(root: Path) -> str:
    Image.new("L", (32, 40)).save(root / "part" / "ground_truth" / "stain" / "000_mask.png")
    return "dataset.category=part"


def _unreadable_image(root: Path) -> str:
    (root / "part" / "train" / "good" / "003.png").write_bytes(b"this is not a png")
    return "dataset.category=part"


def _no_anomalous_test_images(root: Path) -> str:
    for defect in ("scratch", "hole", "stain", "missing"):
        shutil.rmtree(root / "part" / "test" / defect)
    return "dataset.category=part"


CASES = {
    "missing root": (None, "dataset root not found"),
    "missing category": (_missing_category, "category 'nosuchpart' not found"),
    "empty train/good": (_empty_train, "no training images in"),
    "missing mask": (_missing_mask, "no mask for test image"),
    "mask of another size": (_mask_of_other_size, "000_mask.png is 32x40 but its image"),
    "unreadable image": (_unreadable_image, "cannot read image"),
    "no anomalous test images": (_no_anomalous_test_images, "has no anomalous images"),
}


def _bad_dataset_run(case: str, mvtec_root: Path, tmp_path: Path, cache_dir: Path) -> tuple[list[str], Path, list[Path]]:
    """(command arguments, run dir holding an earlier finished run, that run's files) for a case."""
    breaker, _ = CASES[case]
    root = mvtec_root if breaker else tmp_path / "does-not-exist"
    override = breaker(root) if breaker else "dataset.category=part"
    run_dir = tmp_path / "previous-run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"image_auroc": 0.5}))
    OwnedFiles(run_dir, RUN_RECORD).write(["metrics.json"])  # as a finished run of ours lists its files
    args = [
        "dataset=mvtec", *cli_tiny_args(cache_dir, synthetic=False), f"dataset.root={root}", override,
        "dataset.image_size=64", "dataset.crop_size=null", f"hydra.run.dir={run_dir}", "overwrite=true",
    ]
    return args, run_dir, sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))


def _assert_one_line_and_nothing_overwritten(code: int, stderr: str, expected: str, run_dir: Path, before: list[Path]) -> None:
    assert code == 2, stderr
    assert len(error_lines(stderr)) == 1 and expected in error_lines(stderr)[0], stderr
    assert "Traceback" not in stderr
    # overwrite=true replaces a finished run only once the new one succeeds: this one failed.
    assert json.loads((run_dir / "metrics.json").read_text()) == {"image_auroc": 0.5}
    after = sorted(
        p.relative_to(run_dir) for p in run_dir.rglob("*") if not {STAGING, LOCK} & set(p.relative_to(run_dir).parts)
    )
    assert after == before


@pytest.mark.parametrize("case", list(CASES))
def test_bad_dataset_gives_one_line_and_overwrites_nothing(
    case: str, mvtec_root: Path, tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    args, run_dir, before = _bad_dataset_run(case, mvtec_root, tmp_path, cache_dir)
    code, stderr = run_main(args, capsys)  # the command's entry point, in this process
    _assert_one_line_and_nothing_overwritten(code, stderr, CASES[case][1], run_dir, before)


def test_bad_dataset_through_the_real_command(mvtec_root: Path, tmp_path: Path, cache_dir: Path) -> None:
    """The same, as a user meets it: a separate process, its exit status and its stderr."""
    args, run_dir, before = _bad_dataset_run("unreadable image", mvtec_root, tmp_path, cache_dir)
    result = run_cli(*args, cwd=tmp_path)
    _assert_one_line_and_nothing_overwritten(result.returncode, result.stderr, CASES["unreadable image"][1], run_dir, before)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("method=nosuchmethod", "Could not find 'method/nosuchmethod'"),
        ("backbone=nosuchbackbone", "Could not find 'backbone/nosuchbackbone'"),
        ("dataset=nosuchdataset", "Could not find 'dataset/nosuchdataset'"),
    ],
)
def test_unknown_group_option_is_named(override: str, expected: str, tmp_path: Path) -> None:
    result = run_cli(override, cwd=tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr


def test_missing_backbone_level_is_named(tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, stderr = run_main([*cli_tiny_args(cache_dir), "method.levels=[2,6]"], capsys)
    assert code == 2
    assert "anomalib-lite: error: backbone 'tf_efficientnet_lite0' has no feature level 6" in stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("metrics.json"))


def test_the_command_answers_before_importing_torch(tmp_path: Path) -> None:
    """A mistyped option is answered without paying for torch and Lightning (~10 s on a small CPU)."""
    code = "import sys, anomalib_lite.cli; print(sorted({'torch', 'lightning', 'timm'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert result.stdout.strip() == "[]"


def test_only_the_first_process_of_a_distributed_run_prechecks(monkeypatch) -> None:
    """DDP workers (Lightning sets LOCAL_RANK) leave the checks to rank 0, which made them once."""
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert "seed='abc': must be an integer" in precheck(["seed=abc"])
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert precheck(["seed=abc"]) is None
