"""Where the Hydra configs live, the resolvers they use, and checks made before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.feature_extractor import check_levels

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("env_unset"):
        # wandb: offline unless an API key is set.
        OmegaConf.register_new_resolver("env_unset", lambda name: not os.environ.get(name))


_register_resolvers()


def check_config(cfg: DictConfig) -> None:
    """Config-level errors, reported before data is read or a model is built."""
    backbone = cfg.backbone
    if cfg.method.get("levels") is not None:
        check_levels(backbone.name, list(cfg.method.levels), backbone.get("available_levels"))
    weights = str(backbone.weights)
    if weights not in ("hub", "none", "offline") and not Path(weights).expanduser().is_file():
        raise UserInputError(f"backbone weights file not found: {weights} (backbone.weights: hub | none | offline | a file)")
