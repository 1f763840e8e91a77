"""A checkpoint is data from whoever shared it: reading one never runs code.

Each crafted file carries a payload that would create a file when unpickled or built; the tests
check that the payload did not run, and that the refusal is one line saying why.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_DATA, Payload, compose_config

from anomalib_lite import predict
from anomalib_lite.engine.checkpoint import load_model, read_checkpoint
from anomalib_lite.errors import UserInputError
from anomalib_lite.train import run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("real_run")
    run(compose_config([*TINY_DATA, f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}", "method=patchcore"]))
    return out


def _crafted(tmp_path: Path, real_run: Path, change) -> tuple[Path, Path]:  # noqa: ANN001
    """A copy of the real run's checkpoint with `change(stored, marker)` applied: (its run dir, the marker)."""
    marker = tmp_path / "payload_ran"
    stored = read_checkpoint(real_run / "checkpoints" / "model.ckpt")
    stored = {**stored, "state_dict": {k: v.clone() for k, v in stored["state_dict"].items()}}
    change(stored, marker)
    crafted = tmp_path / "shared_run" / "checkpoints" / "model.ckpt"
    crafted.parent.mkdir(parents=True)
    torch.save(stored, crafted)
    return crafted.parent.parent, marker


def _payload_only(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "payload_ran"
    crafted = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "x": Payload(marker)}, crafted)
    return crafted, marker


def test_the_payload_would_run_if_the_file_were_trusted(tmp_path: Path) -> None:
    """The crafted file is a real threat: torch.load(weights_only=False) runs it."""
    crafted, marker = _payload_only(tmp_path)
    torch.load(crafted, weights_only=False)
    assert marker.exists()


def test_a_pickle_payload_alone_is_refused_unrun(tmp_path: Path) -> None:
    crafted, marker = _payload_only(tmp_path)
    with pytest.raises(UserInputError, match=r"refused to load .*model.ckpt: it needs code to be read \(io.open\)"):
        load_model(crafted)
    assert not marker.exists()


def test_a_real_checkpoint_carrying_a_payload_is_refused_unrun(tmp_path: Path, real_run: Path) -> None:
    run_dir, marker = _crafted(tmp_path, real_run, lambda stored, marker: stored.update(extra=Payload(marker)))
    with pytest.raises(UserInputError, match="it needs code to be read"):
        load_model(run_dir)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("where", "change"),
    [
        ("sampler spec", lambda s, m: s["hyper_parameters"]["coreset_sampler"].update(_target_="builtins.open", file=str(m), mode="w")),
        ("method class", lambda s, m: s["anomalib_lite"].update(method_class="builtins.open")),
        ("method class", lambda s, m: s["anomalib_lite"].update(method_class="anomalib_lite.errors.UserInputError")),
    ],
)
def test_what_the_data_names_is_checked_before_it_is_built(where: str, change, tmp_path: Path, real_run: Path) -> None:  # noqa: ANN001
    run_dir, marker = _crafted(tmp_path, real_run, change)
    with pytest.raises(UserInputError, match="refused"):
        load_model(run_dir)
    assert not marker.exists()


def test_predict_refuses_a_crafted_checkpoint_in_one_line(tmp_path: Path, real_run: Path, capsys) -> None:
    run_dir, marker = _crafted(tmp_path, real_run, lambda stored, marker: stored.update(extra=Payload(marker)))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "part.png").write_bytes(next(real_run.rglob("*.png")).read_bytes())
    assert predict.main([str(run_dir), str(tmp_path / "images"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused to load" in err[0] and not marker.exists()


def test_retest_reads_the_checkpoint_as_data(tmp_path: Path, real_run: Path) -> None:
    """experiments/retest.py loads through the same guarded path."""
    run_dir, marker = _crafted(tmp_path, real_run, lambda stored, marker: stored.update(extra=Payload(marker)))
    (run_dir / "config.yaml").write_text((real_run / "config.yaml").read_text())
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, str(repo / "experiments" / "retest.py"), str(run_dir)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and "refused to load" in result.stderr and not marker.exists(), result.stderr[-2000:]


def test_a_real_checkpoint_loads_as_data(real_run: Path) -> None:
    model = load_model(real_run)
    assert not model.training and model.image_resize is not None


def test_lightnings_loader_on_a_method_class_is_the_guarded_one(tmp_path: Path, real_run: Path) -> None:
    """`Patchcore.load_from_checkpoint(...)`, the Lightning idiom, reads as data and checks the specs too."""
    from anomalib_lite.models.padim import Padim
    from anomalib_lite.models.patchcore import Patchcore

    change = lambda s, m: s["hyper_parameters"]["coreset_sampler"].update(_target_="builtins.open", file=str(m), mode="w")  # noqa: E731
    run_dir, marker = _crafted(tmp_path, real_run, change)
    with pytest.raises(UserInputError, match="refused"):
        Patchcore.load_from_checkpoint(run_dir / "checkpoints" / "model.ckpt")
    assert not marker.exists()
    model = Patchcore.load_from_checkpoint(real_run / "checkpoints" / "model.ckpt", num_neighbors=3)
    assert isinstance(model, Patchcore) and model.hparams["num_neighbors"] == 3
    with pytest.raises(UserInputError, match="holds a Patchcore, not a Padim"):
        Padim.load_from_checkpoint(real_run / "checkpoints" / "model.ckpt")
