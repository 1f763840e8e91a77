"""PaDiM as a LightningModule: one pass collects embeddings, the Gaussians are fitted at epoch end."""

from __future__ import annotations

from typing import Any

from anomalib_lite.models.components import MemoryBankModule
from anomalib_lite.models.padim.torch_model import PadimModel


class Padim(MemoryBankModule):
    """`model_args` are PadimModel's (levels, num_features, feature_seed, covariance_eps, blur_sigma)."""

    def __init__(self, backbone: dict, **model_args: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = PadimModel(backbone=dict(backbone), **model_args)
