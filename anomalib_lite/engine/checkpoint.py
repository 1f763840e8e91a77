"""Reading a run's checkpoint, which may come from anyone: data is read, code never runs.

A checkpoint is a pickle, and a pickle can call anything while it is read. It is therefore read
with `torch.load(weights_only=True)`, which unpickles tensors and plain containers only: a file
that needs more (a payload, or an object of some library) is refused with one line naming what it
asked for. Our checkpoints hold plain data only (hyperparameters are the method's config as
dicts), so they need nothing registered.

What the data then *names* is checked before anything is built from it: the method class must be
an `AnomalyModule` of anomalib-lite (or of a package the caller trusts by name), and every
`_target_` in the hyperparameters (the optimiser, scheduler and sampler specs a method
instantiates) must name an object of anomalib-lite or `torch.optim`.

    model = load_model("outputs/runs/<run>")      # or its checkpoints/model.ckpt
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.utils import get_class, instantiate

from anomalib_lite.data import AnomalyDataModule
from anomalib_lite.data.samples import ImageResize
from anomalib_lite.engine.module import AnomalyModule
from anomalib_lite.engine.trained import CHECKPOINT_DIR
from anomalib_lite.errors import UserInputError, one_line
from anomalib_lite.utils.data_only import load_data_only

CHECKPOINT_NAME = f"{CHECKPOINT_DIR}/model.ckpt"  # where a run keeps its model (written by train.py)
# Packages whose classes a checkpoint may name as its method; a user's own method package is
# trusted by passing its name (`trusted_packages`, predict's --trust-package).
METHOD_PACKAGES = ("anomalib_lite",)
# What a `_target_` in the hyperparameters may name: a spec is instantiated when the method is built.
SPEC_PREFIXES = ("anomalib_lite.", "torch.optim.")


def find_checkpoint(path: str | Path) -> Path:
    """A run dir (its checkpoints/model.ckpt) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        if (path / CHECKPOINT_NAME).is_file():
            return path / CHECKPOINT_NAME
        raise UserInputError(f"{path} holds no {CHECKPOINT_NAME}: give a finished run's folder or a .ckpt file")
    if not path.is_file():
        raise UserInputError(f"no such run folder or checkpoint: {path}")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, read as data only (tensors memory-mapped on the CPU, not copied)."""
    stored = load_data_only(path, "checkpoint", mmap=True)
    if not isinstance(stored, dict):
        raise UserInputError(f"{path} is not a checkpoint (it holds a {type(stored).__name__}, not a dict)")
    return stored


def check_specs(node: Any, where: str = "hyper_parameters") -> None:
    """Every `_target_` under `node` names an anomalib-lite or torch.optim object, else one line."""
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if target is not None and not (isinstance(target, str) and target.startswith(SPEC_PREFIXES)):
            raise UserInputError(
                f"refused: the checkpoint's {where} names {target!r} to build, and only anomalib-lite and torch.optim "
                "objects may be named there"
            )
        for key, value in node.items():
            check_specs(value, f"{where}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_specs(value, f"{where}[{i}]")


def method_class(class_path: Any, trusted_packages: Iterable[str] = ()) -> type[AnomalyModule]:
    """The method class a checkpoint names, if it is one of ours (or of a trusted package)."""
    packages = (*METHOD_PACKAGES, *trusted_packages)
    if not isinstance(class_path, str) or class_path.split(".")[0] not in packages:
        raise UserInputError(
            f"refused: the checkpoint names {class_path!r} as its method, which is not in "
            f"{' or '.join(packages)} (a method of your own package: trust it by name, --trust-package)"
        )
    try:
        klass = get_class(class_path)
    except Exception as error:  # noqa: BLE001 - an unknown name is a bad file, not a crash
        raise UserInputError(f"the checkpoint's method {class_path} cannot be found: {one_line(str(error))}") from None
    if not (isinstance(klass, type) and issubclass(klass, AnomalyModule)):
        raise UserInputError(f"refused: the checkpoint's method {class_path} is not an anomalib-lite method class")
    return klass


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def _stored_settings(checkpoint: Path, stored: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """(method class path, resize settings) from the checkpoint, or from its run's config.yaml for
    checkpoints written before the checkpoint carried them."""
    info = stored.get("anomalib_lite")
    if isinstance(info, dict) and info.get("method_class"):
        return info["method_class"], info.get("preprocessing")
    config_path = run_dir_of(checkpoint) / "config.yaml"
    if not config_path.is_file():
        raise UserInputError(
            f"{checkpoint} is not an anomalib-lite checkpoint (no method recorded, and no config.yaml beside its run)"
        )
    try:
        config = yaml.safe_load(config_path.read_text())
        dataset = config.get("dataset", {})
        return config["method"]["_target_"], {"image_size": dataset["image_size"], "crop_size": dataset.get("crop_size")}
    except Exception as error:  # noqa: BLE001
        raise UserInputError(f"{config_path} does not say which method {checkpoint} holds: {one_line(str(error))}") from None


def load_model(
    checkpoint: str | Path,
    map_location: str | torch.device = "cpu",
    trusted_packages: Iterable[str] = (),
    overrides: Mapping[str, Any] | None = None,
) -> AnomalyModule:
    """The method of a run (its folder or a checkpoint file), in eval mode, with its preprocessing.

    Nothing in the file runs: see the module's docstring. `trusted_packages`: names of packages
    besides anomalib_lite whose method classes a checkpoint may name (your own methods).
    `overrides`: method arguments to change from the stored ones (e.g. a test-time knob).
    """
    path = find_checkpoint(checkpoint)
    stored = read_checkpoint(path)
    class_path, preprocessing = _stored_settings(path, stored)
    module_class = method_class(class_path, trusted_packages)
    hyperparameters = stored.get("hyper_parameters", {})
    if not isinstance(hyperparameters, dict) or not isinstance(stored.get("state_dict"), dict):
        raise UserInputError(f"{path} is not an anomalib-lite checkpoint (no hyperparameters or weights)")
    hyperparameters = {**hyperparameters, **(overrides or {})}
    check_specs(hyperparameters)
    try:
        model = module_class(**hyperparameters)
        model.on_load_checkpoint(stored)
        model.load_state_dict(stored["state_dict"])
    except UserInputError:
        raise
    except Exception as error:  # noqa: BLE001 - weights of another shape or method: the file is at fault
        raise UserInputError(f"{path} does not fit its method {class_path}: {one_line(str(error))}") from None
    if preprocessing is not None:
        model.image_resize = ImageResize(**preprocessing)
    if not model.post_processor.is_fitted:
        raise UserInputError(f"{path} holds no fitted thresholds: it was saved before validation finished")
    return model.to(map_location).eval()


def run_datamodule(run_dir: str | Path) -> AnomalyDataModule:
    """A finished run's data module, rebuilt from its config.yaml (read as data, its targets checked
    as a checkpoint's are), e.g. to score the run's test set again."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise UserInputError(f"{run_dir} holds no config.yaml: give a finished run's folder")
    dataset = (yaml.safe_load(config_path.read_text()) or {}).get("dataset")
    if not isinstance(dataset, dict) or not str(dataset.get("_target_", "")).startswith("anomalib_lite."):
        raise UserInputError(f"refused: {config_path} names no anomalib-lite dataset to build")
    check_specs(dataset, "config.yaml's dataset")
    return instantiate(dataset)
