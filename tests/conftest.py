"""Shared fixtures: a tiny synthetic dataset, config composition with small settings, the real CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from anomalib_lite.cli import main
from anomalib_lite.config import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two pytest workers share the machine's cores: one thread each, or they slow each other down.
    import torch

    torch.set_num_threads(1)
CONF = Path(CONFIG_DIR)

# Small enough for seconds-long fits on a 2-core CPU, large enough for meaningful metrics: the
# values of the quick-try data (conf/smoke/data/tiny.yaml; test_configs.py keeps them equal).
TINY_OUTPUTS = ["callbacks.heatmaps.max_per_type=2", "~callbacks.progress"]
TINY_COMMON = [
    "dataset.image_size=96",
    "dataset.batch_size=8",
    "dataset.val_ratio=0.2",
    "dataset.num_workers=0",
    *TINY_OUTPUTS,
]
TINY_SYNTHETIC = [
    "dataset.generated_size=96",
    "dataset.num_train=12",
    "dataset.num_test_good=8",
    "dataset.num_test_per_defect=4",
]
TINY_DATA = TINY_COMMON + TINY_SYNTHETIC


class Payload:
    """A pickle payload for the tests of untrusted files: unpickling it calls open(marker, "w"), so the
    marker file appears if (and only if) the file was read as trusted code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def config_options(group: str) -> list[str]:
    """Every option of a config group: the tests that take it grow with the yaml files."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_config(overrides: list[str]) -> DictConfig:
    """The config the command composes, with Hydra's runtime set up as the command has it."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # method names come from Hydra's choices
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(cache_dir: Path, tmp_path: Path):
    """Compose the real config with tiny data; the run writes into tmp_path/run."""

    def _make(*overrides: str, tiny: bool = True, output_dir: Path | None = None) -> DictConfig:
        return compose_config([
            *(TINY_DATA if tiny else []),
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={output_dir or tmp_path / 'run'}",
            *overrides,
        ])

    return _make


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600, module: str = "anomalib_lite") -> subprocess.CompletedProcess:
    """The real `anomalib-lite` command (as `python -m anomalib_lite`), captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """(exit code, stderr) of `anomalib-lite *args`, in this process (no interpreter start-up).

    Hydra points the root logger at this test's captured stdout; the handlers are put back
    afterwards, or later tests' log lines would go to a closed stream.
    """
    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = ["anomalib-lite", *args]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    code = 0
    capsys.readouterr()
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    return code, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("anomalib-lite: error:")]


def cli_tiny_args(cache_dir: Path, synthetic: bool = True) -> list[str]:
    return [*(TINY_DATA if synthetic else TINY_COMMON), f"paths.cache_dir={cache_dir}"]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups for xdist's `--dist loadgroup` (the Makefile's): a file's tests stay on one worker, so
    its module fixtures are built once, as with `--dist loadfile`; except the end-to-end tests,
    grouped per method, so that the methods' fits (most of the suite's time) spread over workers."""
    for item in items:
        group = item.module.__name__ if item.module is not None else item.nodeid.split("::")[0]
        params = getattr(getattr(item, "callspec", None), "params", {})
        if group.endswith("test_end_to_end") and "method" in params:
            group = f"{group}.{params['method']}"  # no brackets: xdist reads a group only after the last "]"
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def resized_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """PatchCore on 128 px images, resized to 96 and cropped to 80 by the run (predict, export)."""
    from anomalib_lite.train import run

    out = tmp_path_factory.mktemp("resized_run")
    run(compose_config([
        *TINY_DATA, f"paths.cache_dir={cache_dir}", f"paths.output_dir={out}", "method=patchcore",
        "dataset.category=disc", "dataset.generated_size=128", "dataset.crop_size=80",
    ]))
    return out


# OpenVINO runs in a process of its own: imported into pytest's, it leaves the process's stderr
# closed for a later in-process run (`run_main`: "I/O operation on closed file"; a bare
# `import openvino` is enough). So its export and scoring go through a fresh interpreter.
def export_and_score(run_dir: Path, format: str, folder: Path, *image_sets: np.ndarray) -> list[list[np.ndarray]]:
    """Export the run to `folder` in `format`, then score each uint8 B x 3 x H x W set with the
    artefact's own runtime (ONNX Runtime, OpenVINO, torch.jit; no anomalib-lite code): per set,
    its four outputs (pred_score, anomaly_map, pred_label, normalized_map)."""
    import anomalib_lite
    from anomalib_lite import deploy

    if format == "openvino":
        for index, images in enumerate(image_sets):
            np.save(folder.parent / f"{folder.name}-images-{index}.npy", images)
        code = (
            "import sys, numpy as np, anomalib_lite, openvino\n"
            f"folder = {str(folder)!r}\n"
            f"anomalib_lite.export({str(run_dir)!r}, 'openvino', folder)\n"
            "compiled = openvino.Core().compile_model(folder + '/model.xml', 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})\n"
            f"for index in range({len(image_sets)}):\n"
            "    results = compiled(np.load(f'{folder}-images-{index}.npy'))\n"
            "    np.savez(f'{folder}-outputs-{index}.npz', *[results[output] for output in compiled.outputs])\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        loaded = [np.load(folder.parent / f"{folder.name}-outputs-{index}.npz") for index in range(len(image_sets))]
        return [[outputs[f"arr_{i}"] for i in range(4)] for outputs in loaded]
    path = anomalib_lite.export(run_dir, format, folder)
    assert path == folder / deploy.FILES[format][0]
    if format == "torchscript":
        import torch

        artefact = torch.jit.load(str(path))
        with torch.no_grad():
            return [[t.numpy() for t in artefact(torch.from_numpy(images))] for images in image_sets]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, {"images": images}) for images in image_sets]
