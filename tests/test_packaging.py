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
