"""The self-supervised flow as a LightningModule: each normal batch is paired with synthetic
anomalies cut from other training images and blended in (`CutBlendSynthesizer`)."""

from __future__ import annotations

from typing import Any

import torch

from anomalib_lite.data.anomaly_synthesis import CutBlendSynthesizer
from anomalib_lite.models.components import TrainedModule
from anomalib_lite.models.ss_flow.torch_model import SsFlowModel


class SsFlow(TrainedModule):
    """`model_args` are SsFlowModel's; `synthesis` are CutBlendSynthesizer's (num_patches,
    patch_fraction, opacity). The best epoch is chosen by the NLL of held-out normal images."""

    def __init__(
        self,
        backbone: dict,
        epochs: int = 20,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-5,
        synthesis: dict | None = None,
        synthesis_seed: int = 0,
        **model_args: Any,
    ) -> None:
        super().__init__(epochs=epochs, learning_rate=learning_rate, weight_decay=weight_decay)
        self.save_hyperparameters()
        self.model = SsFlowModel(backbone=dict(backbone), **model_args)
        self.synthesis_seed = synthesis_seed
        self.synthesizer = CutBlendSynthesizer(**(synthesis or {}), seed=synthesis_seed)

    def on_fit_start(self) -> None:
        # Each DDP rank draws its own anomalies, reproducibly.
        self.synthesizer.reseed(self.synthesis_seed + self.global_rank)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        anomalous, masks = self.synthesizer(images)
        loss, anomalous_term = self.model.self_supervised_loss(images, anomalous, masks)
        size = len(images)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        self.log("train_anomaly_hinge", anomalous_term, on_step=False, on_epoch=True, batch_size=size)
        return loss
