"""The self-supervised flow as a LightningModule: each normal batch is paired with synthetic
anomalies cut from other training images and blended in (`CutBlendSynthesizer`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from anomalib_lite.data.anomaly_synthesis import CutBlendSynthesizer
from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.ss_flow.torch_model import SsFlowModel


class SsFlow(TrainedModule):
    """SsFlowModel's arguments; `synthesis` are CutBlendSynthesizer's (num_patches,
    patch_fraction, opacity). The best epoch is chosen by the NLL of held-out normal images."""

    model_class = SsFlowModel
    model: SsFlowModel

    def __init__(self, synthesis: Mapping[str, Any] | None = None, synthesis_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.synthesis_seed = synthesis_seed
        self.synthesizer = CutBlendSynthesizer(**(synthesis or {}), seed=synthesis_seed)

    def on_fit_start(self) -> None:
        # Each DDP rank draws its own anomalies, reproducibly.
        self.synthesizer.reseed(self.synthesis_seed + self.global_rank)

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        anomalous, masks, _ = self.synthesizer(batch.image)
        loss, hinge = self.model.self_supervised_loss(batch.image, anomalous, masks)
        return {"loss": loss, "anomaly_hinge": hinge}
