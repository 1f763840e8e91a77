"""RegAD as a LightningModule: before fitting, the registration network is loaded from its cached
training on other categories (or trained first); fitting is then one pass over the support set
(the run's training images: `dataset.num_shots=k` for the few-shot setting), nothing trained."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from anomalib_lite.engine import MemoryBankModule
from anomalib_lite.models.regad.registration import load_or_train_registration
from anomalib_lite.models.regad.torch_model import NUM_SUPPORT_VIEWS, RegadModel
from anomalib_lite.schema import PositiveInt

log = logging.getLogger(__name__)


class Regad(MemoryBankModule):
    """RegadModel's arguments (levels, stn_mode, normalize_inputs, head_channels, augment_support,
    covariance_eps, blur_sigma), `epochs` of the registration training, and `registration`: how it
    is trained when no cached network matches (`categories`, `shots`, `batch_size`, `lr`, `momentum`, `seed`,
    `cache_dir`, `synthetic_root`; see `regad.registration`)."""

    model_class = RegadModel
    model: RegadModel

    def __init__(self, epochs: PositiveInt, registration: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epochs = epochs
        self.registration_settings = dict(registration)

    def build_model(self, backbone: Mapping[str, Any] | None, **model_args: Any) -> RegadModel:
        if backbone is None:
            raise ValueError("RegAD registers backbone features: method.backbone is missing")
        self.model_settings = {"backbone": dict(backbone), **model_args}
        return super().build_model(backbone, **model_args)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return  # a fitted model's registration network is in its checkpoint
        datamodule = self.trainer.datamodule
        settings = dict(self.registration_settings)
        shots = settings.pop("shots", None) or datamodule.num_shots or 2
        run_images = [s.image_path for s in (datamodule.train_samples or []) + datamodule.test_samples + datamodule.val_samples]
        own_synthetic = datamodule.category if datamodule.dataset_name == "synthetic" else None
        load_or_train_registration(
            self.model.registration, self.model_settings, datamodule.resize, shots=shots, epochs=self.epochs, run_images=run_images,
            run_synthetic_category=own_synthetic, device=self.trainer.strategy.root_device, **settings,
        )
        self.model.registration.to(self.device).requires_grad_(False).eval()
        views = NUM_SUPPORT_VIEWS if self.model.augment_support else 1
        log.info("RegAD: fitting the Gaussians on %d support images (%d views each)", len(datamodule.train_samples), views)
