"""CutPaste as a LightningModule: each batch of normal images becomes three classes (normal,
CutPaste, CutPaste-Scar), for the image network and, with localisation, for random patches of
the images for the patch network. The densities are refitted on the training images before
every validation (`FittedOnEmbeddings`); the epoch with the best label-free validation image
AUROC is kept."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from anomalib_lite.data.anomaly_synthesis import CutPasteSynthesizer
from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.cutpaste.torch_model import CutPasteModel


class CutPaste(TrainedModule):
    """CutPasteModel's arguments; `synthesis`: CutPasteSynthesizer's (area, aspect, scar sizes,
    scar rotation, colour jitter), shared by both kinds."""

    model_class = CutPasteModel
    model: CutPasteModel
    best_epoch_monitor = ("val_synthetic_image_auroc", "max")

    def __init__(self, synthesis: Mapping[str, Any] | None = None, synthesis_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.synthesis_seed = synthesis_seed
        self.cutpaste = CutPasteSynthesizer("cutpaste", **(synthesis or {}), seed=synthesis_seed)
        self.scar = CutPasteSynthesizer("scar", **(synthesis or {}), seed=synthesis_seed + 1)
        self.crop_generator = torch.Generator().manual_seed(synthesis_seed + 2)

    def on_fit_start(self) -> None:
        # Each DDP rank draws its own augmentations, reproducibly.
        offset = 3 * (self.synthesis_seed + self.global_rank)
        self.cutpaste.reseed(offset)
        self.scar.reseed(offset + 1)
        self.crop_generator.manual_seed(offset + 2)

    def _three_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [images, self.cutpaste(images).images, self.scar(images).images]

    def _random_crops(self, images: torch.Tensor) -> torch.Tensor:
        size = self.model.patch_size
        height, width = images.shape[-2:]
        tops = torch.randint(0, height - size + 1, (len(images),), generator=self.crop_generator).tolist()
        lefts = torch.randint(0, width - size + 1, (len(images),), generator=self.crop_generator).tolist()
        return torch.stack([image[:, top : top + size, left : left + size] for image, top, left in zip(images, tops, lefts)])

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        patch_views = self._three_views(self._random_crops(batch.image)) if self.model.localization else None
        return self.model.classification_loss(self._three_views(batch.image), patch_views)
