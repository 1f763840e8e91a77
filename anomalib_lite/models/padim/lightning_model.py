"""PaDiM as a LightningModule: one pass collects embeddings, the Gaussians are fitted at epoch end."""

from __future__ import annotations

import logging

import torch

from anomalib_lite.engine import MemoryBankModule
from anomalib_lite.models.padim.torch_model import PadimModel

log = logging.getLogger(__name__)


class Padim(MemoryBankModule):
    """The arguments are PadimModel's (levels, num_features, feature_seed, covariance_eps, blur_sigma)."""

    model_class = PadimModel
    model: PadimModel

    def fit_model(self, embeddings: torch.Tensor) -> None:
        num_images, dim = embeddings.shape[:2]
        if num_images < 2 * dim:
            log.warning(
                "PaDiM: %d fitted images for %d-dimensional Gaussians: fewer than 2 x d, so the covariances are close "
                "to singular and the scores lean on method.covariance_eps; fit %d images or more, or set "
                "method.num_features=%d", num_images, dim, 2 * dim, max(1, num_images // 2),
            )
        super().fit_model(embeddings)
