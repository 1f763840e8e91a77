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
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomalib_lite.data.samples import is_image_file
from anomalib_lite.errors import UserInputError, one_line
from anomalib_lite.utils.data_only import load_data_only

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


def load_pretrained(network: nn.Module, source: str, cache_dir: str | Path, setting: str) -> None:
    """Published weights for `network` (a teacher) instead of distilling it: a state dict in a file,
    or at a URL (downloaded once into `<cache_dir>/downloads`), read as data only.

    The keys may be ours or another code base's (the authors', anomalib's): where they differ, the
    tensors are matched in order, and every shape must agree. Anything else is one line naming `setting`.
    """
    if re.match(r"^[a-z][a-z0-9+.-]*://", source):
        path = Path(cache_dir).expanduser() / "downloads" / Path(urllib.parse.urlparse(source).path).name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(source, str(path), progress=False)  # atomic: a temporary file, then a rename
            except Exception as error:  # noqa: BLE001 - no network, a 404: the user's to fix
                raise UserInputError(f"{setting}={source}: cannot download it: {one_line(str(error))}") from None
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserInputError(f"{setting}={source}: no such file (a state dict file or a URL)")
    state = load_data_only(path, f"{setting}:")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    own = network.state_dict()
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)} if isinstance(state, dict) else {}
    if set(tensors) != set(own):  # another code base's names: match in order
        mismatch = len(tensors) != len(own) or any(
            a.shape != b.shape for a, b in zip(tensors.values(), own.values())
        )
        if mismatch:
            shapes = [tuple(v.shape) for v in tensors.values()]
            raise UserInputError(
                f"{setting}={source}: does not fit this teacher ({len(tensors)} tensors, first shapes {shapes[:2]}; "
                f"the network has {len(own)}, first shapes {[tuple(v.shape) for v in own.values()][:2]})"
            )
        tensors = dict(zip(own, tensors.values()))
    try:
        network.load_state_dict(tensors)
    except RuntimeError as error:
        raise UserInputError(f"{setting}={source}: does not fit this teacher: {one_line(str(error))}") from None
    log.info("%s: the teacher's weights are %s's (not distilled)", setting, source)


def time_to_go(done: int, total: int, elapsed: float) -> str:
    """ "about 2.5 h to go" at the pace so far (for the progress lines of long one-off builds)."""
    if done <= 0 or done >= total:
        return "done" if done >= total else "starting"
    left = elapsed / done * (total - done)
    return f"about {left / 3600:.1f} h to go" if left > 5400 else f"about {left / 60:.0f} min to go" if left > 90 else f"about {left:.0f} s to go"


def load_or_build(
    network: nn.Module,
    cache_dir: str | Path,
    name: str,
    inputs: Mapping[str, Any],
    build: Callable[[nn.Module], Mapping[str, Any]],
    device: torch.device | str | None = None,
    cheaper: str = "",
) -> Path:
    """Load `network`'s weights from the cached artefact for `inputs`, or train them with
    `build(network)` (which returns a report: steps, images, ...) and cache them.

    `device`: where a build runs (the run's accelerator: a GPU distils in minutes what a CPU does
    in hours); `network` is moved there for `build`, whose work follows `network`'s device, and
    moved back after. The artefact is the same on any device up to floating-point order: the
    random draws come from CPU generators.

    The file is written atomically (a temporary name, then a rename), so an interrupted build
    leaves nothing that a later run would take for finished.

    `cheaper`: what a user who does not want to wait can do instead (said when a build starts; the
    build's progress lines say how long it has to go).
    """
    path = artefact_path(cache_dir, name, inputs)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(saved["state_dict"])
        report = saved.get("report", {})
        log.info("%s: reusing %s (built in %.0f s: %s)", name, path, report.get("seconds", float("nan")),
                 ", ".join(f"{k} {v}" for k, v in report.items() if k != "seconds"))
        return path
    log.warning(
        "%s: a one-off build for these settings (cached for every later run: %s)%s", name, path,
        f"; it can take long on a CPU: {cheaper}" if cheaper else "",
    )
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
