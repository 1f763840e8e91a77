"""A synthetic MVTec-layout dataset with known defects and exact masks, generated on demand.

Categories are two textures and one object; every defect image carries one of four defect
types drawn through a mask, so the mask is exactly the set of changed pixels:
  scratch  - a thin bright polyline
  hole     - a dark ellipse with a darker core
  stain    - a translucent coloured blob (union of ellipses)
  missing  - a region that is gone: flat backing (textures) or a notch cut out of the object
Generation is seeded per category and cached under `root`; a completed category carries a
`.complete` file with its parameters, and is written to a temporary folder first and renamed into
place, so an interrupted or concurrent run never leaves a half-written category behind. A cached
category is never deleted or rewritten (another run may be reading it): the data module keeps
each set of generation settings in its own folder (`cache_key`), so runs with other settings,
in sequence or side by side in a sweep, each read their own.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Annotated

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from anomalib_lite.data.datamodule import MVTecDataModule
from anomalib_lite.errors import UserInputError
from anomalib_lite.schema import PositiveInt, Range

CATEGORIES = ("stripes", "weave", "disc")
DEFECT_TYPES = ("scratch", "hole", "stain", "missing")
GENERATOR_VERSION = 1  # raised when the generator's output changes: the cache then fills a new folder


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return noise / (noise.std() + 1e-8)


def _texture(category: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A normal image (H x W x 3 in [0, 1]) and its foreground mask (where defects may go)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    grain = 0.04 * _smooth_noise(rng, size, 1.0) + 0.05 * _smooth_noise(rng, size, 8.0)
    foreground = np.ones((size, size), dtype=bool)
    if category == "stripes":
        angle = np.deg2rad(30 + rng.normal(0, 2))
        wave = np.sin(2 * np.pi * 9 * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
        base = 0.55 + 0.18 * wave + grain
        colour = np.array([0.85, 0.62, 0.35])
        image = base[..., None] * colour / 0.55
    elif category == "weave":
        phase = rng.uniform(0, 2 * np.pi, size=2)
        warp = np.sin(2 * np.pi * 12 * xx + phase[0])
        weft = np.sin(2 * np.pi * 12 * yy + phase[1])
        base = 0.5 + 0.12 * np.sign(warp * weft) * np.abs(warp) + 0.06 * weft + grain
        image = base[..., None] * np.array([0.55, 0.7, 0.9]) / 0.5
    elif category == "disc":
        centre = 0.5 + rng.normal(0, 0.01, size=2)
        radius = np.hypot(xx - centre[0], yy - centre[1])
        foreground = (radius < 0.38) & (radius > 0.12)
        rings = 0.6 + 0.08 * np.sin(2 * np.pi * 40 * radius) + 1.5 * grain * 0.5
        background = 0.12 + 0.5 * grain * 0.3
        base = np.where(foreground, rings, background)
        image = base[..., None] * np.array([0.9, 0.9, 0.95])
    else:
        raise UserInputError(f"unknown synthetic category '{category}' (choose from: {', '.join(CATEGORIES)})")
    return np.clip(image, 0, 1), foreground


def _random_point(rng: np.random.Generator, size: int, foreground: np.ndarray) -> tuple[float, float]:
    """A point in the central region (defects survive a center crop) on the foreground."""
    ys, xs = np.nonzero(foreground[int(size * 0.25) : int(size * 0.75), int(size * 0.25) : int(size * 0.75)])
    pick = rng.integers(len(ys))
    return float(xs[pick] + int(size * 0.25)), float(ys[pick] + int(size * 0.25))


def _draw_defect(
    defect: str, image: np.ndarray, foreground: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    scale = size / 256
    mask_image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_image)
    x, y = _random_point(rng, size, foreground)
    if defect == "scratch":
        points = [(x, y)]
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(rng.integers(2, 5)):
            angle += rng.normal(0, 0.5)
            length = rng.uniform(15, 35) * scale
            x, y = x + length * np.cos(angle), y + length * np.sin(angle)
            points.append((x, y))
        draw.line(points, fill=255, width=max(2, round(3 * scale)))
    elif defect == "hole":
        rx, ry = rng.uniform(6, 14, size=2) * scale
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)
    elif defect == "stain":
        for _ in range(rng.integers(3, 6)):
            cx, cy = x + rng.normal(0, 6 * scale), y + rng.normal(0, 6 * scale)
            rx, ry = rng.uniform(5, 12, size=2) * scale
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    elif defect == "missing":
        half = rng.uniform(10, 20) * scale
        corners = [(x + half * np.cos(a), y + half * np.sin(a)) for a in np.sort(rng.uniform(0, 2 * np.pi, 5))]
        draw.polygon(corners, fill=255)
    mask = (np.asarray(mask_image) > 0) & foreground
    result = image.copy()
    if defect == "scratch":
        result[mask] = 0.95
    elif defect == "hole":
        core = ndimage.binary_erosion(mask, iterations=max(1, round(2 * scale)))
        result[mask] = 0.08
        result[core] = 0.02
    elif defect == "stain":
        result[mask] = 0.35 * result[mask] + 0.65 * np.array([0.35, 0.2, 0.1])
    elif defect == "missing":
        # Textures show their flat backing; the object shows the background it sits on.
        fill = 0.12 if not foreground.all() else 0.3
        result[mask] = fill
    return result, mask


def _save(path: Path, array: np.ndarray) -> None:
    Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)


def generate_category(
    root: str | Path,
    category: str,
    image_size: int = 256,
    num_train: int = 40,
    num_test_good: int = 10,
    num_test_per_defect: int = 5,
    seed: int = 0,
) -> Path:
    """Write one synthetic category in MVTec layout under `root` (cached) and return its folder."""
    root = Path(root).expanduser()
    params = {
        "category": category, "image_size": image_size, "num_train": num_train,
        "num_test_good": num_test_good, "num_test_per_defect": num_test_per_defect, "seed": seed,
        "version": GENERATOR_VERSION,
    }
    target = root / category
    marker = target / ".complete"
    if marker.is_file():
        if json.loads(marker.read_text()) == params:
            return target
        raise UserInputError(
            f"{target} holds a synthetic dataset generated with other settings ({marker.read_text().strip()}): "
            "choose another root (SyntheticDataModule keeps one folder per setting)"
        )
    if target.exists():
        raise UserInputError(f"{target} exists but is not a synthetic dataset written by anomalib-lite; choose another dataset.root")
    if category not in CATEGORIES:
        raise UserInputError(f"unknown synthetic category '{category}' (choose from: {', '.join(CATEGORIES)})")

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{category}-", dir=root))
    rng = np.random.default_rng([zlib.crc32(category.encode()), seed])
    folders = {"train": staging / "train" / "good", "test_good": staging / "test" / "good"}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for i in range(num_train):
        _save(folders["train"] / f"{i:03d}.png", _texture(category, rng, image_size)[0])
    for i in range(num_test_good):
        _save(folders["test_good"] / f"{i:03d}.png", _texture(category, rng, image_size)[0])
    for defect in DEFECT_TYPES:
        (staging / "test" / defect).mkdir(parents=True)
        (staging / "ground_truth" / defect).mkdir(parents=True)
        for i in range(num_test_per_defect):
            image, foreground = _texture(category, rng, image_size)
            image, mask = _draw_defect(defect, image, foreground, rng)
            _save(staging / "test" / defect / f"{i:03d}.png", image)
            Image.fromarray(mask.astype(np.uint8) * 255).save(staging / "ground_truth" / defect / f"{i:03d}_mask.png")
    (staging / ".complete").write_text(json.dumps(params))
    try:
        os.rename(staging, target)
    except OSError:  # another process finished the same category first
        shutil.rmtree(staging, ignore_errors=True)
        if not marker.is_file():
            raise
    return target


def cache_key(generator_args: dict) -> str:
    """The cache folder's name for a set of generation settings (readable, and version-stamped)."""
    a = generator_args
    return (
        f"v{GENERATOR_VERSION}_{a['image_size']}px_train{a['num_train']}_good{a['num_test_good']}"
        f"_defect{a['num_test_per_defect']}_seed{a['seed']}"
    )


class SyntheticDataModule(MVTecDataModule):
    """The default dataset: generated on first use, then read like any MVTec category."""

    dataset_name = "synthetic"

    def __init__(
        self,
        root: str | Path,
        category: str = "stripes",
        generated_size: Annotated[int, Range(low=16)] = 256,
        num_train: PositiveInt = 40,
        num_test_good: PositiveInt = 10,
        num_test_per_defect: PositiveInt = 5,
        **kwargs,
    ) -> None:
        super().__init__(root=root, category=category, **kwargs)
        self.generator_args = {
            "image_size": generated_size, "num_train": num_train, "num_test_good": num_test_good,
            "num_test_per_defect": num_test_per_defect, "seed": self.seed,
        }
        # One cache folder per generation setting: a run never rewrites data another run reads.
        self.root = self.root / cache_key(self.generator_args)

    def prepare_data(self) -> None:
        generate_category(self.root, self.category, **self.generator_args)

    def scan(self):
        self.prepare_data()  # idempotent: a no-op once the category is cached
        return super().scan()
