"""Sample lists, image reading and the torch Dataset shared by every data layout."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from anomalib_lite.data.batch import Item
from anomalib_lite.data.image_io import read_image, read_mask
from anomalib_lite.data.protocols import RandomRotationCrop
from anomalib_lite.errors import UserInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    image_path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal images
    mask_path: Path | None = None


def is_image_file(path: Path) -> bool:
    """An image by its extension, not a mask (`*_mask`) and not hidden."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.stem.endswith("_mask") and not path.name.startswith(".")


def check_file_name(path: Path) -> Path:
    """`path`, if its name can be written into predictions.csv, metrics.json and heatmap titles (UTF-8)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(os.fsencode(path))[2:-1]  # the bytes, those that are not UTF-8 as \xff
        raise UserInputError(f"file name is not valid UTF-8: {shown}: rename it") from None
    return path


def list_images(directory: Path) -> list[Path]:
    """Image files directly in `directory`, sorted by name (masks excluded)."""
    if not directory.is_dir():
        return []
    return sorted(check_file_name(p) for p in directory.iterdir() if is_image_file(p))


class ImageResize:
    """Resize to `image_size`, then optionally center-crop to `crop_size` (the papers' 256 -> 224).

    Images: `to_tensor` / `resize_batch` (float, torch); masks: `__call__` (Pillow, nearest).
    """

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

    def resize_batch(self, images: torch.Tensor, always_resample: bool = False) -> torch.Tensor:
        """B x C x H x W float -> resized (antialiased bilinear, Pillow's filter) and cropped.

        The one image resize: the data sets, the model's forward() and an exported graph use it, so
        a picture scores the same from an 8-bit file, a 16-bit file or a tensor. `always_resample`:
        also at the target size (exact there), so a traced graph resizes every input size.
        """
        if always_resample or tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        if self.crop:
            top, left = (self.size[0] - self.crop[0]) // 2, (self.size[1] - self.crop[1]) // 2
            images = images[..., top : top + self.crop[0], left : left + self.crop[1]]
        return images

    def settings(self) -> dict[str, list[int] | None]:
        """What rebuilds this resize: `ImageResize(**settings)` (a checkpoint stores it)."""
        return {"image_size": list(self.size), "crop_size": list(self.crop) if self.crop else None}

    def to_tensor(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """An 8-bit RGB image or a float H x W x 3 array in [0, 1] -> 3 x H' x W' float in [0, 1].

        Values become floats in [0, 1] before resizing (no rounding back to 8 bits), as in
        `forward()`: 8-bit v and 16-bit 257 v are the same float, hence the same input.
        """
        if isinstance(image, Image.Image):
            tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        return self.resize_batch(tensor.unsqueeze(0))[0].clamp(0, 1).contiguous()


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


class AnomalyDataset(Dataset):
    """Images as float tensors in [0, 1] (RGB, C x H x W) with their masks (H x W, 0/1), as `Item`s."""

    def __init__(
        self, samples: Sequence[Sample], resize: ImageResize, mask_threshold: float = 0, geometry: RandomRotationCrop | None = None
    ) -> None:
        self.samples = list(samples)
        self.resize = resize
        self.mask_threshold = mask_threshold
        # A per-image transform after the resize (`protocols`: RdMVTec's rotation and random crop).
        self.geometry = geometry

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> torch.Tensor:
        # Grey, palette, RGBA, 16-bit and float inputs all become RGB in [0, 1] (image_io).
        image = self.resize.to_tensor(read_image(self.samples[index].image_path))
        return self.geometry.image(image, str(self.samples[index].image_path)) if self.geometry else image

    def load_mask(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        mask_path = self.samples[index].mask_path
        if mask_path is None:
            return torch.zeros(size)
        mask = self.resize(Image.fromarray(read_mask(mask_path, self.mask_threshold)), Image.Resampling.NEAREST)
        mask = torch.from_numpy(np.asarray(mask, dtype=np.float32))
        return self.geometry.mask(mask, str(self.samples[index].image_path)) if self.geometry else mask

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
