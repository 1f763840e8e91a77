"""PaDiM as a LightningModule: one pass collects embeddings, the Gaussians are fitted at epoch end."""

from __future__ import annotations

from collections.abc import Sequence

from anomalib_lite.models.components import MemoryBankModule
from anomalib_lite.models.padim.torch_model import PadimModel


class Padim(MemoryBankModule):
    def __init__(
        self,
        backbone: dict,
        levels: Sequence[int] = (1, 2, 3),
        num_features: int | None = 100,
        feature_seed: int = 0,
        covariance_eps: float = 0.01,
        blur_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = PadimModel(
            backbone=dict(backbone),
            levels=levels,
            num_features=num_features,
            feature_seed=feature_seed,
            covariance_eps=covariance_eps,
            blur_sigma=blur_sigma,
        )
