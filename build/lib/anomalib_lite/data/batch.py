"""What the data modules hand to the methods and callbacks: one typed item per image, one typed batch.

Every loader of every data module yields `Batch`es (train, validation and test alike), so a
method or a callback reads `batch.image` or `batch.mask` and never a string key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Item:
    """One image as a dataset returns it."""

    image: torch.Tensor  # 3 x H x W, float in [0, 1]
    mask: torch.Tensor  # H x W, 0/1 (all zero for normal images and images without a mask)
    label: int  # 0 normal, 1 anomalous (real or synthetic)
    index: int  # position in its dataset: the key for gathering results across DDP ranks
    defect_type: str  # "good" for normal images
    image_path: str
    has_mask: bool  # a pixel ground truth exists (normal images: trivially, all zero)


@dataclass
class Batch:
    """A collated list of `Item`s. Lightning moves its tensors to the device (it maps dataclasses)."""

    image: torch.Tensor  # B x 3 x H x W
    mask: torch.Tensor  # B x H x W
    label: torch.Tensor  # B, long
    index: torch.Tensor  # B, long
    has_mask: torch.Tensor  # B, bool
    defect_type: list[str]
    image_path: list[str]

    def __len__(self) -> int:
        return self.image.shape[0]

    def pin_memory(self) -> Batch:
        """DataLoader(pin_memory=True) calls this on custom batch types."""
        return Batch(
            self.image.pin_memory(), self.mask.pin_memory(), self.label.pin_memory(), self.index.pin_memory(),
            self.has_mask.pin_memory(), self.defect_type, self.image_path,
        )


def collate_items(items: Sequence[Item]) -> Batch:
    """DataLoader collate_fn: stack the tensors, keep the strings as lists."""
    return Batch(
        image=torch.stack([item.image for item in items]),
        mask=torch.stack([item.mask for item in items]),
        label=torch.tensor([item.label for item in items], dtype=torch.long),
        index=torch.tensor([item.index for item in items], dtype=torch.long),
        has_mask=torch.tensor([item.has_mask for item in items], dtype=torch.bool),
        defect_type=[item.defect_type for item in items],
        image_path=[item.image_path for item in items],
    )
