"""FastFlow as a LightningModule: Adam on the flows' parameters for `epochs` epochs."""

from __future__ import annotations

from typing import Any

from anomalib_lite.models.components import TrainedModule
from anomalib_lite.models.fastflow.torch_model import FastflowModel


class Fastflow(TrainedModule):
    """`model_args` are FastflowModel's (levels, flow_steps, hidden_ratio, conv3x3_only, clamp)."""

    def __init__(
        self, backbone: dict, epochs: int = 20, learning_rate: float = 1e-3, weight_decay: float = 1e-5, **model_args: Any
    ) -> None:
        super().__init__(epochs=epochs, learning_rate=learning_rate, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.model = FastflowModel(backbone=dict(backbone), **model_args)
