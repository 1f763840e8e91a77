"""RegAD's registration training: on categories other than the one it will score, cached.

The authors' loop (train.py of github.com/MediaBrain-SJTU/RegAD): every epoch, each category's
normal training images are shuffled and cut into batches of `batch_size` queries; each query gets
`shots` support images drawn from the rest of its category; the batches of all categories are
visited in random order. One SGD step per batch (lr 1e-4, momentum 0.9) on the Siamese loss of
the queries' and the supports' last-level registered maps; the learning rate follows a cosine
set at the start of each epoch, lr * (1 + cos(pi * e / E)) / 2 for e = 1 .. E (so, as in the code,
the last epoch runs at 0 and only moves BatchNorm statistics). The code trains one network per k
(`shots` = the k of the test); it keeps the epoch with the best *test* AUROC, which a run here may
not: the artefact is the last epoch's network.

Categories are folders of normal images (e.g. `<mvtec>/<category>/train/good`), or `synthetic`:
the package's built-in synthetic categories (generated on first use). Training on a category that
the run scores is refused (leave-one-category-out); `synthetic` leaves the run's own out.
The result is an artefact (`components.teacher_artefact`): its name hashes the recipe, the
folders' listings and the image size, and a later run with the same inputs loads it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from anomalib_lite.data.image_io import read_image
from anomalib_lite.data.samples import ImageResize, list_images
from anomalib_lite.data.synthetic import CATEGORIES, generate_category
from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.teacher_artefact import folder_fingerprint, load_or_build, time_to_go
from anomalib_lite.models.regad.torch_model import Registration

log = logging.getLogger(__name__)

# Bumped when `train_registration` changes what it builds.
REGISTRATION_RECIPE = 1
SYNTHETIC = "synthetic"


def resolve_categories(
    entries: Sequence[str], synthetic_root: str | Path, run_images: Sequence[Path], run_synthetic_category: str | None = None
) -> list[Path]:
    """The training folders: each entry a folder of normal images, or `synthetic` for the built-in
    categories other than the run's own (`run_synthetic_category`). A folder holding any of the
    run's images (`run_images`: its training and test images) is refused."""
    if not entries:
        raise UserInputError("method.registration.categories is empty: RegAD is trained on other categories (e.g. [synthetic])")
    run_folders = {Path(p).resolve().parent for p in run_images}
    folders: list[Path] = []
    for entry in entries:
        if str(entry) == SYNTHETIC:
            for category in CATEGORIES:
                if category == run_synthetic_category:
                    log.info("RegAD: leaving the run's own synthetic category '%s' out of the registration training", category)
                    continue
                folders.append(generate_category(synthetic_root, category) / "train" / "good")
            continue
        folder = Path(entry).expanduser()
        if not folder.is_dir():
            raise UserInputError(f"method.registration.categories: folder not found: {folder}")
        if folder.resolve() in run_folders:
            raise UserInputError(
                f"method.registration.categories holds {folder}, a folder of the run's own images: RegAD registers on "
                "other categories only (leave-one-category-out)"
            )
        folders.append(folder)
    for folder in folders:
        if len(list_images(folder)) < 2:
            raise UserInputError(f"RegAD registration: {folder} has fewer than 2 images (a query needs supports of its category)")
    return folders


def load_category(folder: Path, resize: ImageResize) -> torch.Tensor:
    """A folder's images, resized as the run's, as N x 3 x H x W uint8 (compact in memory)."""
    images = [resize.to_tensor(read_image(path)) for path in list_images(folder)]
    return (torch.stack(images) * 255).round().to(torch.uint8)


def epoch_batches(sizes: Sequence[int], batch_size: int, shots: int, generator: torch.Generator) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """One epoch's batches: (category, query indices, B x shots support indices), in random order.

    Each category's images are shuffled and cut into batches; each query's supports are drawn
    uniformly from the other images of its category (with replacement across draws, as the code)."""
    batches = []
    for category, size in enumerate(sizes):
        order = torch.randperm(size, generator=generator)
        for start in range(0, size, batch_size):
            queries = order[start : start + batch_size]
            # A draw from the size - 1 others: shift the indices at or above the query's by one.
            draws = torch.randint(0, size - 1, (len(queries), shots), generator=generator)
            supports = draws + (draws >= queries[:, None]).long()
            batches.append((category, queries, supports))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def train_registration(
    registration: Registration, categories: Sequence[torch.Tensor], shots: int, epochs: int, batch_size: int,
    lr: float, momentum: float, seed: int,
) -> dict[str, Any]:
    """Train `registration` in place (train mode) on the categories' images (uint8 N x 3 x H x W
    each); returns a report (epochs, steps, images, last epoch's mean loss)."""
    device = next(registration.parameters()).device
    registration.requires_grad_(True).train()
    optimizer = torch.optim.SGD(registration.parameters(), lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    sizes = [len(images) for images in categories]
    steps, epoch_loss, start = 0, float("nan"), time.perf_counter()
    for epoch in range(1, epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        batches = epoch_batches(sizes, batch_size, shots, generator)
        total = 0.0
        for number, (category, queries, supports) in enumerate(batches, 1):
            images = categories[category]
            query_images = images[queries].to(device).float() / 255
            support_images = images[supports.flatten()].to(device).float().div(255).view(*supports.shape, *images.shape[1:])
            loss = registration.loss(query_images, support_images)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
            if number % 10 == 0 or number == len(batches):
                elapsed = time.perf_counter() - start
                log.info("RegAD registration: epoch %d/%d, batch %d/%d, loss %.4f, %.0f s, %s", epoch, epochs, number,
                         len(batches), total / number, elapsed,
                         time_to_go((epoch - 1) * len(batches) + number, epochs * len(batches), elapsed))
        epoch_loss = total / max(1, len(batches))
    registration.requires_grad_(False).eval()
    return {"epochs": epochs, "steps": steps, "images": sum(sizes), "loss": round(epoch_loss, 4)}


def load_or_train_registration(
    registration: Registration, model_settings: Mapping[str, Any], resize: ImageResize, categories: Sequence[str],
    synthetic_root: str | Path, cache_dir: str | Path, shots: int, epochs: int, batch_size: int, lr: float,
    momentum: float, seed: int, run_images: Sequence[Path], run_synthetic_category: str | None = None,
    device: torch.device | str | None = None,
) -> Path:
    """Load the cached registration for these inputs, or train it on `categories` and cache it."""
    for name, value in (("shots", shots), ("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise UserInputError(f"method.registration.{name} must be at least 1, got {value}")
    folders = resolve_categories(categories, synthetic_root, run_images, run_synthetic_category)
    inputs = {
        "recipe": REGISTRATION_RECIPE, "model": dict(model_settings), "image_size": resize.settings(),
        "categories": [(str(folder), folder_fingerprint(folder)) for folder in folders],
        "shots": shots, "epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum, "seed": seed,
    }

    def build(network: Registration) -> dict[str, Any]:
        log.info("RegAD registration: training on %d categories (%s), k = %d, %d epochs",
                 len(folders), ", ".join(str(f) for f in folders), shots, epochs)
        images = [load_category(folder, resize) for folder in folders]
        return train_registration(network, images, shots, epochs, batch_size, lr, momentum, seed)

    cheaper = f"the authors train it {epochs} epochs; a quick try trains 1 (smoke=regad), or method.epochs=N"
    return load_or_build(registration, cache_dir, "regad_registration", inputs, build, device=device, cheaper=cheaper)
