"""Teachers distilled here, cached on disk: built by the first run that needs one, reused after.

Some teacher-student methods need a small pretrained descriptor network that no registry here
ships (EfficientAD's PDN, Uninformed Students' patch descriptors): the method distils it from the
configured pretrained backbone on a folder of images. That takes minutes to hours, so the result
is an artefact: its file name is a hash of everything that determines it (the method's recipe,
the backbone, the image folder's listing, steps, seed, `ARTEFACT_VERSION`), and a run whose inputs
hash the same loads it instead of training again. Change any input and a new one is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomalib_lite.data.samples import is_image_file

log = logging.getLogger(__name__)

# Bump when the distillation code changes in a way the recorded inputs do not show.
ARTEFACT_VERSION = 1


def folder_fingerprint(root: str | Path | None) -> str | None:
    """A digest of a folder's image files (relative paths and sizes): edits to the folder change it."""
    if root is None:
        return None
    root = Path(root).expanduser()
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p)):
        digest.update(f"{path.relative_to(root)}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def artefact_path(cache_dir: str | Path, name: str, inputs: Mapping[str, Any]) -> Path:
    """Where the artefact for these inputs lives: `<cache_dir>/<name>-<hash of inputs>.pt`."""
    recipe = json.dumps({"version": ARTEFACT_VERSION, **inputs}, sort_keys=True, default=str)
    return Path(cache_dir).expanduser() / f"{name}-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.pt"


def load_or_build(
    network: nn.Module,
    cache_dir: str | Path,
    name: str,
    inputs: Mapping[str, Any],
    build: Callable[[nn.Module], Mapping[str, Any]],
    device: torch.device | str | None = None,
) -> Path:
    """Load `network`'s weights from the cached artefact for `inputs`, or train them with
    `build(network)` (which returns a report: steps, images, ...) and cache them.

    `device`: where a build runs (the run's accelerator: a GPU distils in minutes what a CPU does
    in hours); `network` is moved there for `build`, whose work follows `network`'s device, and
    moved back after. The artefact is the same on any device up to floating-point order: the
    random draws come from CPU generators.

    The file is written atomically (a temporary name, then a rename), so an interrupted build
    leaves nothing that a later run would take for finished.
    """
    path = artefact_path(cache_dir, name, inputs)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(saved["state_dict"])
        report = saved.get("report", {})
        log.info("%s: reusing %s (built in %.0f s: %s)", name, path, report.get("seconds", float("nan")),
                 ", ".join(f"{k} {v}" for k, v in report.items() if k != "seconds"))
        return path
    log.info("%s: no cached artefact for these inputs; building %s", name, path)
    home = next(network.parameters()).device
    network.to(device or home)
    start = time.perf_counter()
    report = dict(build(network))
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["device"] = str(device or home)
    network.to(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    torch.save({"state_dict": network.state_dict(), "inputs": dict(inputs), "report": report}, partial)
    partial.replace(path)
    log.info("%s: built in %.0f s and cached at %s", name, report["seconds"], path)
    return path
