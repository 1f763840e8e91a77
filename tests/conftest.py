"""Shared fixtures: a tiny synthetic dataset and config composition with small settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from anomalib_lite.config import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent

# Small enough for seconds-long fits on a 2-core CPU, large enough for meaningful metrics.
TINY_COMMON = [
    "dataset.image_size=96",
    "dataset.batch_size=8",
    "dataset.val_ratio=0.2",
    "dataset.num_workers=0",
    "callbacks.heatmaps.max_per_type=2",
    "~callbacks.progress",
]
TINY_SYNTHETIC = [
    "dataset.generated_size=96",
    "dataset.num_train=12",
    "dataset.num_test_good=4",
    "dataset.num_test_per_defect=2",
]
TINY_DATA = TINY_COMMON + TINY_SYNTHETIC


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(cache_dir: Path, tmp_path: Path):
    """Compose the real config with tiny data; the run writes into tmp_path/run."""

    def _make(*overrides: str, tiny: bool = True) -> DictConfig:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[
                    *(TINY_DATA if tiny else []),
                    f"paths.cache_dir={cache_dir}",
                    f"paths.output_dir={tmp_path / 'run'}",
                    *overrides,
                ],
            )

    return _make


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real `anomalib-lite` command (as `python -m anomalib_lite`), captured."""
    return subprocess.run(
        [sys.executable, "-m", "anomalib_lite", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def cli_tiny_args(cache_dir: Path, synthetic: bool = True) -> list[str]:
    return [*(TINY_DATA if synthetic else TINY_COMMON), f"paths.cache_dir={cache_dir}"]
