"""Sample lists, image reading and the torch Dataset shared by every data layout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from anomalib_lite.data.batch import Item
from anomalib_lite.errors import UserInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    image_path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal images
    mask_path: Path | None = None


def list_images(directory: Path) -> list[Path]:
    """Image files directly in `directory`, sorted by name (masks excluded)."""
    if not directory.is_dir():
        return []
    return sorted(
        p for p in directory.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.stem.endswith("_mask") and not p.name.startswith(".")
    )


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; a file that is not a readable image is a user error."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise UserInputError(f"cannot read image {path}: {error}") from None


def check_samples(samples: Sequence[Sample]) -> None:
    """Every image readable, every defect image with a mask of its own size."""
    for sample in samples:
        size = image_size(sample.image_path)
        if sample.mask_path is None:
            continue
        if not sample.mask_path.is_file():
            raise UserInputError(f"no mask for test image {sample.image_path} (expected {sample.mask_path})")
        mask_size = image_size(sample.mask_path)
        if mask_size != size:
            raise UserInputError(
                f"mask {sample.mask_path} is {mask_size[0]}x{mask_size[1]} but its image "
                f"{sample.image_path} is {size[0]}x{size[1]}"
            )


def _open(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError) as error:
        raise UserInputError(f"cannot read image {path}: {error}") from None


class ImageResize:
    """Resize to `image_size`, then optionally center-crop to `crop_size` (the papers' 256 -> 224)."""

    def __init__(self, image_size: int | Sequence[int], crop_size: int | Sequence[int] | None = None) -> None:
        self.size = _pair(image_size)
        self.crop = _pair(crop_size) if crop_size else None
        if self.crop and (self.crop[0] > self.size[0] or self.crop[1] > self.size[1]):
            raise UserInputError(f"crop_size {crop_size} is larger than image_size {image_size}")

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop or self.size

    def __call__(self, image: Image.Image, resample: Image.Resampling) -> Image.Image:
        height, width = self.size
        image = image.resize((width, height), resample)
        if self.crop:
            top, left = (height - self.crop[0]) // 2, (width - self.crop[1]) // 2
            image = image.crop((left, top, left + self.crop[1], top + self.crop[0]))
        return image


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


class AnomalyDataset(Dataset):
    """Images as float tensors in [0, 1] (RGB, C x H x W) with their masks (H x W, 0/1), as `Item`s."""

    def __init__(self, samples: Sequence[Sample], resize: ImageResize) -> None:
        self.samples = list(samples)
        self.resize = resize

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> torch.Tensor:
        # Grayscale, palette and RGBA inputs all become RGB.
        image = self.resize(_open(self.samples[index].image_path, "RGB"), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def load_mask(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        mask_path = self.samples[index].mask_path
        if mask_path is None:
            return torch.zeros(size)
        mask = self.resize(_open(mask_path, "L"), Image.Resampling.NEAREST)
        return torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))

    def __getitem__(self, index: int) -> Item:
        sample = self.samples[index]
        image = self.load_image(index)
        return Item(
            image=image,
            mask=self.load_mask(index, image.shape[1:]),
            label=sample.label,
            index=index,
            defect_type=sample.defect_type,
            image_path=str(sample.image_path),
            has_mask=sample.mask_path is not None or sample.label == 0,
        )
