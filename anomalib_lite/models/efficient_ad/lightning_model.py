"""EfficientAD as a LightningModule: the teacher is loaded from its cached distillation (or
distilled first) when fitting starts; every training batch adds the autoencoder's colour-jittered
copy and as many penalty images from outside the training set (the authors' ImageNet; a texture
folder or the package's procedural textures here)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kornia.augmentation as K
import torch

from anomalib_lite.data.anomaly_sources import anomaly_source
from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.efficient_ad.teacher import load_or_distill_teacher
from anomalib_lite.models.efficient_ad.torch_model import EfficientAdModel

log = logging.getLogger(__name__)


class EfficientAd(TrainedModule):
    """EfficientAdModel's arguments (image_size, model_size, out_channels, hard_quantile) and:

    - `teacher`: how the PDN teacher is distilled from the backbone when no cached artefact
      matches (`images`: a folder, or null for procedural textures; `cache_dir`, `levels`,
      `image_size`, `steps`, `batch_size`, `seed`; see `efficient_ad.teacher`);
    - `penalty_images`: a folder of images unlike the training set (the paper: ImageNet), or null
      for procedural textures; `penalty: false` drops the term (the authors' code without ImageNet).
    """

    model_class = EfficientAdModel
    model: EfficientAdModel

    def __init__(
        self,
        teacher: Mapping[str, Any],
        penalty: bool = True,
        penalty_images: str | None = None,
        penalty_grey_probability: float = 0.3,
        augmentation_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.teacher_settings = dict(teacher)
        self.penalty = penalty
        self.penalty_source = anomaly_source(str(Path(penalty_images).expanduser()) if penalty_images else None) if penalty else None
        self.penalty_grey_probability = penalty_grey_probability
        self.augmentation_seed = augmentation_seed
        self.generator = torch.Generator().manual_seed(augmentation_seed)
        # The autoencoder's input: each image jittered in one of brightness, contrast or saturation.
        self.jitters = [K.ColorJitter(brightness=0.2), K.ColorJitter(contrast=0.2), K.ColorJitter(saturation=0.2)]

    def build_model(self, backbone: Mapping[str, Any] | None, **model_args: Any) -> EfficientAdModel:
        self.backbone_settings = dict(backbone) if backbone is not None else None  # only for distilling the teacher
        return self.model_class(**model_args)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return  # validating or testing a fitted model: the teacher's weights are in the checkpoint
        if self.backbone_settings is None:
            raise ValueError("EfficientAD distils its teacher from a backbone: method.backbone is missing")
        load_or_distill_teacher(
            self.model.teacher, self.model.model_size, self.model.out_channels, self.backbone_settings,
            normalize=self.model.normalize, device=self.trainer.strategy.root_device, **self.teacher_settings,
        )
        self.model.teacher.to(self.device)

    def on_fit_start(self) -> None:
        self.generator.manual_seed(self.augmentation_seed + self.global_rank)
        if self.penalty_source is not None:
            log.info("EfficientAD penalty images: %s", self.penalty_source.describe())

    def penalty_images(self, count: int, height: int, width: int) -> torch.Tensor:
        """Resized to twice the image size, 30 % grey, centre-cropped (authors' code)."""
        images = self.penalty_source.draw(count, 2 * height, 2 * width, self.generator)
        grey = torch.rand(count, generator=self.generator) < self.penalty_grey_probability
        if grey.any():
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images[grey] = (images[grey] * weights).sum(1, keepdim=True).expand(-1, 3, -1, -1)
        top, left = height // 2, width // 2
        return images[:, :, top : top + height, left : left + width].to(self.device)

    def jitter(self, images: torch.Tensor) -> torch.Tensor:
        choice = torch.randint(len(self.jitters), (len(images),), generator=self.generator).to(images.device)
        jittered = images.clone()
        for k, augment in enumerate(self.jitters):
            chosen = choice == k
            if chosen.any():
                jittered[chosen] = augment(images[chosen]).clamp(0, 1)
        return jittered

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        images = batch.image
        penalty = self.penalty_images(len(images), *images.shape[-2:]) if self.penalty_source is not None else None
        return self.model.training_terms(images, self.jitter(images), penalty)
