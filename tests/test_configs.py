"""Every option of every config group composes, and its objects instantiate."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from conftest import run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf

from anomalib_lite.config import CONFIG_DIR, check_config
from anomalib_lite.data import AnomalyDataModule
from anomalib_lite.models.components import AnomalyModule

CONF = Path(CONFIG_DIR)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options() -> None:
    for group in ("method", "backbone", "dataset", "trainer", "logger", "callbacks", "experiment", "hparams_search"):
        assert _options(group), group
    assert {"patchcore", "padim"} <= set(_options("method"))
    assert {"wide_resnet50_2", "resnet18", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(_options("backbone"))
    assert {"synthetic", "mvtec", "folder"} <= set(_options("dataset"))
    assert {"cpu", "gpu", "ddp", "ddp_cpu"} <= set(_options("trainer"))
    assert {"csv", "tensorboard", "wandb"} <= set(_options("logger"))


@pytest.mark.parametrize("method", _options("method"))
@pytest.mark.parametrize("backbone", _options("backbone"))
def test_every_method_composes_with_every_backbone(method: str, backbone: str, make_cfg) -> None:
    cfg = make_cfg(f"method={method}", f"backbone={backbone}")
    check_config(cfg)
    assert cfg.method._target_.startswith("anomalib_lite.models.")
    assert set(cfg.method.levels) <= set(cfg.backbone.available_levels)


def test_methods_build_on_every_backbone_family(make_cfg) -> None:
    for method in _options("method"):
        cfg = make_cfg(f"method={method}", "backbone=resnet18", "backbone.weights=none")
        module = instantiate(cfg.method, backbone=OmegaConf.to_container(cfg.backbone))
        assert isinstance(module, AnomalyModule)


@pytest.mark.parametrize("dataset", _options("dataset"))
def test_every_dataset_instantiates(dataset: str, make_cfg, tmp_path: Path) -> None:
    extra = [f"dataset.normal_dir={tmp_path}", f"dataset.abnormal_dir={tmp_path}"] if dataset == "folder" else []
    cfg = make_cfg(f"dataset={dataset}", *extra, tiny=False)
    datamodule = instantiate(cfg.dataset)
    assert isinstance(datamodule, AnomalyDataModule)


@pytest.mark.parametrize("trainer", _options("trainer"))
def test_every_trainer_composes(trainer: str, make_cfg) -> None:
    cfg = make_cfg(f"trainer={trainer}")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    if cfg.trainer.accelerator == "cpu":
        assert isinstance(instantiate(cfg.trainer, logger=False), L.Trainer)


@pytest.mark.parametrize("logger", _options("logger"))
def test_every_logger_instantiates(logger: str, make_cfg, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(f"logger={logger}")
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    if logger == "wandb":
        assert cfg.logger.wandb.offline is True  # no API key: offline
    assert len(loggers) == (0 if logger == "none" else 1)


def test_callbacks_instantiate(make_cfg) -> None:
    cfg = make_cfg("callbacks=default", tiny=False)
    names = {type(instantiate(c)).__name__ for c in cfg.callbacks.values()}
    assert {"CoresetSampling", "AnomalyMetrics", "HeatmapExport", "TQDMProgressBar"} <= names


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment: str, make_cfg) -> None:
    cfg = make_cfg(f"experiment={experiment}", tiny=False)
    check_config(cfg)
    assert cfg.dataset._target_.endswith("MVTecDataModule")
    assert cfg.dataset.image_size == 256 and cfg.dataset.crop_size == 224


@pytest.mark.parametrize("search", _options("hparams_search"))
def test_every_hparams_search_composes(search: str) -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.params and cfg.optimized_metric in ("pixel_aupro", "image_auroc", "pixel_auroc")


def test_cli_prints_the_composed_config(tmp_path: Path) -> None:
    result = run_cli("method=padim", "backbone=resnet18", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.method._target_ == "anomalib_lite.models.padim.Padim"
    assert printed.backbone.name == "resnet18"
