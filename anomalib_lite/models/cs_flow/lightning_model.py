"""CS-Flow as a LightningModule: Adam on the cross-scale flow for `epochs` epochs."""

from __future__ import annotations

from typing import Any

from anomalib_lite.models.components import TrainedModule
from anomalib_lite.models.cs_flow.torch_model import CsFlowModel


class CsFlow(TrainedModule):
    """`model_args` are CsFlowModel's (levels, coupling_blocks, hidden_channels, kernel_sizes, clamp)."""

    def __init__(
        self, backbone: dict, epochs: int = 20, learning_rate: float = 2e-4, weight_decay: float = 1e-5, **model_args: Any
    ) -> None:
        super().__init__(epochs=epochs, learning_rate=learning_rate, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.model = CsFlowModel(backbone=dict(backbone), **model_args)
