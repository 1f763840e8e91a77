"""The config groups: every option composes, instantiates and says what the code expects of it.

Options are read from the group folders, so a new yaml is checked without editing this file.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from conftest import CONF, REPO, TINY_DATA, compose_config, config_options, run_cli
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from anomalib_lite.config import check_config, uses_backbone
from anomalib_lite.data import AnomalyDataModule
from anomalib_lite.engine import AnomalyModule
from anomalib_lite.errors import UserInputError

GROUPS = ("method", "backbone", "dataset", "trainer", "logger", "callbacks", "experiment", "hparams_search", "smoke")


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert config_options(group), group
    assert {"patchcore", "padim"} <= set(config_options("method"))
    assert {"wide_resnet50_2", "resnet18", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(config_options("backbone"))
    assert {"synthetic", "mvtec", "folder"} <= set(config_options("dataset"))
    assert {"cpu", "gpu", "ddp", "ddp_cpu"} <= set(config_options("trainer"))
    assert {"csv", "tensorboard", "wandb"} <= set(config_options("logger"))


@pytest.mark.parametrize("method", config_options("method"))
def test_method_config_names_its_own_folder(method: str, make_cfg) -> None:
    """One folder per method, named as its config: `_target_` is a LightningModule of that folder."""
    cfg = make_cfg(f"method={method}")
    folder = REPO / "anomalib_lite" / "models" / method
    assert (folder / "torch_model.py").is_file() and (folder / "lightning_model.py").is_file()
    assert cfg.method._target_.startswith(f"anomalib_lite.models.{method}.")
    assert issubclass(get_class(cfg.method._target_), AnomalyModule)


@pytest.mark.parametrize("method", config_options("method"))
@pytest.mark.parametrize("backbone", config_options("backbone"))
def test_every_backbone_method_composes_with_every_backbone(method: str, backbone: str, make_cfg) -> None:
    cfg = make_cfg(f"method={method}")
    if not uses_backbone(cfg):
        pytest.skip(f"{method} trains its own network")
    cfg = make_cfg(f"method={method}", f"backbone={backbone}")
    check_config(cfg)
    assert cfg.method.backbone.name == cfg.backbone.name  # the method's backbone is the chosen one
    if "levels" in cfg.method:  # methods on feature maps (not those on pooled features, e.g. CutPaste)
        assert set(cfg.method.levels) <= set(cfg.method.backbone.available_levels)


@pytest.mark.parametrize("method", config_options("method"))
def test_every_method_builds_as_the_run_builds_it(method: str, make_cfg) -> None:
    overrides = [f"method={method}"]
    if uses_backbone(make_cfg(*overrides)):
        overrides += ["backbone=resnet18", "backbone.weights=none"]
    module = instantiate(make_cfg(*overrides).method, _convert_="all", _recursive_=False)
    assert isinstance(module, AnomalyModule)
    # Hyperparameters are plain data: the checkpoint rebuilds the method from them.
    assert all(isinstance(v, (str, int, float, bool, list, dict, type(None))) for v in module.hparams.values())


@pytest.mark.parametrize("dataset", config_options("dataset"))
def test_every_dataset_instantiates(dataset: str, make_cfg, tmp_path: Path) -> None:
    extra = [f"dataset.normal_dir={tmp_path}", f"dataset.abnormal_dir={tmp_path}"] if dataset == "folder" else []
    cfg = make_cfg(f"dataset={dataset}", *extra, tiny=False)
    datamodule = instantiate(cfg.dataset)
    assert isinstance(datamodule, AnomalyDataModule)
    assert datamodule.val_synthesis is not None  # every layout validates on synthetic anomalies by default


@pytest.mark.parametrize("trainer", config_options("trainer"))
def test_every_trainer_composes(trainer: str, make_cfg) -> None:
    cfg = make_cfg(f"trainer={trainer}")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.trainer.max_epochs is None, "epochs are the method's unless a user sets trainer.max_epochs"
    if cfg.trainer.accelerator == "cpu":
        assert isinstance(instantiate(cfg.trainer, logger=False), L.Trainer)


@pytest.mark.parametrize("logger", config_options("logger"))
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
    assert {"AnomalyMetrics", "HeatmapExport", "EpochTimer", "Progress"} <= names


@pytest.mark.parametrize("experiment", config_options("experiment"))
@pytest.mark.parametrize("method", config_options("method"))
def test_every_experiment_composes_with_every_method(experiment: str, method: str, make_cfg) -> None:
    """An experiment made for one method (`override /method: X`) passes the schema with it; with
    another method, its method settings are refused in one line rather than failing at build time
    (or, for a method without a backbone and an experiment that sets one, in Hydra's one line)."""
    try:
        cfg = make_cfg(f"method={method}", f"experiment={experiment}", tiny=False)
    except ConfigCompositionException as error:
        assert "Could not override 'backbone'" in str(error), error
        assert not uses_backbone(make_cfg(f"method={method}"))
        return
    defaults = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")).get("defaults", [])
    own = [next(iter(d.values())) for d in defaults if isinstance(d, dict) and "override /method" in d]
    if own and own[0] != method:
        with pytest.raises(UserInputError, match=r"^method\.\w+ is not a setting of"):
            check_config(cfg)
    else:
        check_config(cfg)
    assert isinstance(instantiate(cfg.dataset), AnomalyDataModule)


@pytest.mark.parametrize("smoke", config_options("smoke"))
def test_every_smoke_setting_belongs_to_its_method(smoke: str, make_cfg) -> None:
    """`smoke=<name>` (a method's settings for tiny data, which the end-to-end tests run) picks the
    method of its name on its own, and everything it sets is a setting of that method."""
    assert smoke in config_options("method")
    cfg = make_cfg(f"smoke={smoke}")
    assert cfg.method._target_.startswith(f"anomalib_lite.models.{smoke}.")
    check_config(cfg)
    assert cfg == make_cfg(f"method={smoke}", f"smoke={smoke}")


def test_every_method_has_a_quick_try_on_the_suites_tiny_data() -> None:
    """`smoke=<method>` exists for every method (the README's quick try; the end-to-end tests run it),
    and its data is the suite's tiny data (conftest.TINY_DATA, on the category `disc`): the two cannot
    drift apart. A method's own smoke file may change the category or the number of images."""
    assert config_options("smoke") == config_options("method")
    preset = compose_config(["smoke=patchcore"]).dataset
    suite = compose_config([*TINY_DATA, "method=patchcore", "dataset.category=disc"]).dataset
    assert preset == suite


@pytest.mark.parametrize("search", config_options("hparams_search"))
def test_every_hparams_search_optimises_a_validation_metric(search: str) -> None:
    """Hyperparameters are chosen on held-out normal images (with synthetic anomalies), never the test set;
    every searched key exists in the method's config."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={search}", "paths.output_dir=run"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.optimized_metric.startswith("val_synthetic_")
    check_config(cfg)
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None, key


def test_a_test_metric_cannot_be_optimised(make_cfg) -> None:
    with pytest.raises(UserInputError, match="optimized_metric=pixel_aupro is a test-set metric"):
        check_config(make_cfg("optimized_metric=pixel_aupro"))
    check_config(make_cfg("optimized_metric=val_synthetic_image_auroc"))
    with pytest.raises(UserInputError, match="dataset.val_synthesis is null"):
        check_config(make_cfg("dataset.val_synthesis=null"))


def test_cli_prints_the_composed_config(tmp_path: Path) -> None:
    result = run_cli("method=padim", "backbone=resnet18", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.method._target_ == "anomalib_lite.models.padim.Padim"
    assert printed.backbone.name == "resnet18" and printed.method.backbone.name == "resnet18"


def test_a_method_built_in_python_is_checked_as_its_config_is(make_cfg) -> None:
    """One source of bounds: the annotations. A method, its nested sampler spec and a data module
    built in Python are refused with the config's own line, before any constructor runs."""
    ognet = OmegaConf.to_container(make_cfg("method=ognet").method, resolve=True)
    ognet_class = get_class(ognet.pop("_target_"))
    with pytest.raises(UserInputError, match=r"^method.old_fraction=1.5: must be a number in \(0, 1\)$"):
        ognet_class(**{**ognet, "old_fraction": 1.5})
    with pytest.raises(UserInputError, match=r"^method.epochs=0: must be an integer at least 1$"):
        ognet_class(**{**ognet, "epochs": 0})
    patchcore = OmegaConf.to_container(make_cfg("method=patchcore").method, resolve=True)
    patchcore_class = get_class(patchcore.pop("_target_"))
    spec = {**patchcore["coreset_sampler"], "ratio": 2}
    with pytest.raises(UserInputError, match=r"^method.coreset_sampler.ratio=2: must be a number in \(0, 1\]$"):
        patchcore_class(**{**patchcore, "coreset_sampler": spec})
    with pytest.raises(UserInputError, match=r"^dataset.num_shots=0: must be an integer at least 1 or null$"):
        get_class("anomalib_lite.data.MVTecDataModule")("root", "category", num_shots=0)
