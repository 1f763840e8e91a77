"""Where the Hydra configs live (inside the package), their resolvers, and checks made before any work starts."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from anomalib_lite.errors import UserInputError
from anomalib_lite.run_dir import check_writable
from anomalib_lite.schema import check_node

MAX_SEED = 2**32 - 1  # numpy's and Lightning's seeds are 32-bit unsigned
# Found through the package, so an installed wheel has its configs too.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def _run_name(choices: Mapping[str, str], category: str, backbone: str | None = None) -> str:
    """method[_backbone]_category: the run folder's name (methods without a backbone have none).

    The backbone by its model's name, as metrics.json and collect's tables name it."""
    parts = [choices.get("method"), backbone, category]
    return "_".join(str(part) for part in parts if part)


def project_dir() -> str:
    """The source checkout the package runs from (its pyproject.toml beside the package), else the current directory."""
    checkout = Path(__file__).resolve().parent.parent
    return str(checkout) if (checkout / "pyproject.toml").is_file() else os.getcwd()


def _input_size(image_size: int | Sequence[int], crop_size: int | Sequence[int] | None) -> int | list[int]:
    """The size the model sees: the crop if there is one, else the resized image (for methods
    whose networks are built for one input size, e.g. EfficientAD's autoencoder)."""
    size = image_size if crop_size is None else crop_size
    return size if isinstance(size, int) else list(size)


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("env_unset"):
        # wandb: offline unless an API key is set.
        OmegaConf.register_new_resolver("env_unset", lambda name: not os.environ.get(name))
    if not OmegaConf.has_resolver("project_dir"):
        OmegaConf.register_new_resolver("project_dir", project_dir)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", _run_name)
    if not OmegaConf.has_resolver("input_size"):
        OmegaConf.register_new_resolver("input_size", _input_size)


_register_resolvers()


def method_name(cfg: DictConfig) -> str:
    """A method's name is its config's name (Hydra's choice in the method group).

    Composed without Hydra's runtime (the Python API), the name of the method's package folder,
    which by convention is the config's name: anomalib_lite.models.cs_flow.CsFlow -> cs_flow.
    """
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("method")
        if choice:
            return str(choice)
    return str(cfg.method._target_).split(".")[-2]


def uses_backbone(cfg: DictConfig) -> bool:
    """Methods built on a pretrained feature extractor reference the backbone group in their config."""
    return "backbone" in cfg.method


def check_config(cfg: DictConfig) -> None:
    """Config-level errors, reported before data is read or a model is built.

    Every `_target_` node is checked against its constructor's typed signature (`schema`).
    """
    if not isinstance(cfg.get("seed"), int) or isinstance(cfg.get("seed"), bool):
        raise UserInputError(f"seed={cfg.get('seed')!r}: must be an integer")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise UserInputError(f"seed={cfg.seed}: must be from 0 to {MAX_SEED} (the generators' seed range)")
    accelerator = str(cfg.get("trainer", {}).get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda"):
        import torch  # only here: a CPU run's command answers without it

        if not torch.cuda.is_available():
            raise UserInputError(
                f"trainer.accelerator={accelerator}: this machine has no CUDA GPU (torch.cuda.is_available() is False); "
                "use trainer=cpu"
            )
    if not isinstance(cfg.get("overwrite", False), bool):
        raise UserInputError(f"overwrite={cfg.get('overwrite')!r}: must be true or false")
    for group in ("method", "dataset", "trainer"):
        if group in cfg and isinstance(cfg[group], DictConfig) and "_target_" in cfg[group]:
            check_node(cfg[group], group)
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            if isinstance(node, DictConfig) and "_target_" in node:
                check_node(node, f"{group}.{name}")
    if str(cfg.dataset.get("_target_", "")).endswith("SyntheticDataModule"):
        check_writable(Path(str(cfg.paths.cache_dir)), "paths.cache_dir")  # the generated data is cached there
    metric = cfg.get("optimized_metric")
    if metric is not None and not str(metric).startswith("val_"):
        raise UserInputError(
            f"optimized_metric={metric} is a test-set metric: choosing settings on it fits them to the test labels "
            "(use val_synthetic_aupro, val_synthetic_image_auroc or val_synthetic_pixel_auroc)"
        )
    if metric is not None and str(metric).startswith("val_synthetic_") and cfg.dataset.get("val_synthesis", {}) is None:
        raise UserInputError(f"optimized_metric={metric} needs the synthetic validation view, but dataset.val_synthesis is null")
    if not uses_backbone(cfg):
        return
    # torch and timm: imported here, not with the config module (the command answers typos without them)
    from anomalib_lite.models.components.feature_extractor import check_levels

    backbone = cfg.method.backbone
    if cfg.method.get("levels") is not None:
        check_levels(backbone.name, list(cfg.method.levels), backbone.get("available_levels"))
    weights = str(backbone.weights)
    if weights not in ("hub", "none", "offline") and not Path(weights).expanduser().is_file():
        raise UserInputError(f"backbone weights file not found: {weights} (backbone.weights: hub | none | offline | a file)")


_BACKBONE_OVERRIDE = re.compile(r"^[+~]*backbone([.=@/]|$)")


def backbone_override_error(overrides: Sequence[str]) -> str | None:
    """The error line for `backbone=...` given to a method that trains its own network, else None.

    Hydra alone would answer "Could not override 'backbone'. No match in the defaults list": the
    method's config has no backbone to override. Composing the config without those overrides
    tells whether that is the case. Sweeps (comma lists) are left to Hydra.
    """
    settings = [arg for arg in overrides if "=" in arg and not arg.startswith("-")]
    given = [arg for arg in settings if _BACKBONE_OVERRIDE.match(arg)]
    if not given or any("," in arg for arg in settings if not arg.startswith("hydra")):
        return None
    from hydra import compose, initialize_config_dir

    # Hydra's own settings stay out, but for the search path (a user's method configs may live there).
    rest = [
        arg for arg in settings
        if arg not in given and (not arg.startswith(("hydra.", "hydra/", "+hydra")) or arg.startswith("hydra.searchpath"))
    ]
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=rest, return_hydra_config=True)
    except Exception:  # noqa: BLE001 - any other problem is Hydra's to report, with its own message
        return None
    if uses_backbone(cfg):
        return None
    name = cfg.hydra.runtime.choices.get("method")
    return f"method '{name}' trains its own network and takes no backbone: drop {' '.join(given)}"
