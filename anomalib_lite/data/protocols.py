"""Evaluation protocols that change the images' geometry, the same for an image and its mask.

RdMVTec (Defard et al., PaDiM, section on non-aligned images): each image is rotated by
U(-`max_angle`, `max_angle`) degrees and a random `crop_size` window of the resized image is taken
instead of the centre crop, for training and test images alike. The draw is fixed per image file
(seeded by the run's seed and the file's path), so a test image is transformed the same way in every
run, epoch and DDP layout, and its mask exactly as the image (nearest for the mask).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

import torch
from kornia.geometry.transform import rotate

from anomalib_lite.errors import UserInputError

Protocol = Literal["aligned", "rd"]


@dataclass(frozen=True)
class Placement:
    angle: float  # degrees, counter-clockwise
    top: int
    left: int


class RandomRotationCrop:
    """RdMVTec's per-image rotation and random crop of images already resized to `image_size`."""

    def __init__(self, image_size: tuple[int, int], crop_size: tuple[int, int], max_angle: float = 10.0, seed: int = 0) -> None:
        if crop_size[0] > image_size[0] or crop_size[1] > image_size[1]:
            raise UserInputError(f"crop_size {crop_size} is larger than image_size {image_size}")
        self.image_size, self.crop_size = image_size, crop_size
        self.max_angle = max_angle
        self.seed = seed

    def placement(self, key: str) -> Placement:
        """The draw for the image `key` (its path): the same in every process."""
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{key}".encode()))
        angle = (torch.rand((), generator=generator).item() * 2 - 1) * self.max_angle
        top = int(torch.randint(self.image_size[0] - self.crop_size[0] + 1, (), generator=generator))
        left = int(torch.randint(self.image_size[1] - self.crop_size[1] + 1, (), generator=generator))
        return Placement(angle, top, left)

    def _apply(self, tensor: torch.Tensor, key: str, mode: str) -> torch.Tensor:
        place = self.placement(key)
        rotated = rotate(tensor.unsqueeze(0), torch.tensor([place.angle], dtype=tensor.dtype), mode=mode, align_corners=False)[0]
        return rotated[..., place.top : place.top + self.crop_size[0], place.left : place.left + self.crop_size[1]].contiguous()

    def image(self, image: torch.Tensor, key: str) -> torch.Tensor:
        """3 x H x W image in [0, 1] -> 3 x h x w: rotated (bilinear, black outside) and cropped."""
        return self._apply(image, key, "bilinear").clamp(0, 1)

    def mask(self, mask: torch.Tensor, key: str) -> torch.Tensor:
        """H x W 0/1 mask -> h x w, rotated (nearest) and cropped exactly as its image."""
        return self._apply(mask.unsqueeze(0), key, "nearest")[0]
