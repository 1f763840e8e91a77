"""The package as a user installs it: a wheel (not an editable install) carries every config."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import CONF, REPO


def test_the_wheel_holds_every_config_and_module(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(REPO / "anomalib_lite", source / "anomalib_lite", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("anomalib_lite-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"anomalib_lite/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert len(configs) > 20 and configs <= names, sorted(configs - names)
    modules = {f"anomalib_lite/{p.relative_to(REPO / 'anomalib_lite').as_posix()}" for p in (REPO / "anomalib_lite").rglob("*.py")}
    assert modules <= names, sorted(modules - names)


def test_every_command_is_installed_and_answers(tmp_path: Path) -> None:
    """The commands a user types, as the install made them (not only `python -m`)."""
    bin_dir = Path(sys.executable).parent
    for command in ("anomalib-lite", "anomalib-lite-predict", "anomalib-lite-export", "anomalib-lite-collect"):
        assert (bin_dir / command).is_file(), f"{command} is not installed: pip install -e . (make install)"
    result = subprocess.run([str(bin_dir / "anomalib-lite-collect"), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == f"collect: error: no metrics.json under {tmp_path}"
    result = subprocess.run(
        [str(bin_dir / "anomalib-lite-export"), str(tmp_path), "--format", "onnx", "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith("holds no checkpoints/model.ckpt: give a finished run's folder or a .ckpt file")
