"""DRAEM as a LightningModule: every training batch is rotated (30 %, +-90 deg) and half of it
receives Perlin-shaped texture anomalies (`PerlinSynthesizer`); the epoch kept is the one with
the best label-free validation AUPRO (held-out normal images with synthetic anomalies)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from anomalib_lite.data.anomaly_synthesis import PerlinSynthesizer
from anomalib_lite.data.batch import Batch
from anomalib_lite.models.components import TrainedModule
from anomalib_lite.models.draem.torch_model import DraemModel

log = logging.getLogger(__name__)


class Draem(TrainedModule):
    """DraemModel's arguments; `anomaly_source`: a folder of texture images (the paper: DTD), or
    null for the package's procedural textures; `synthesis`: PerlinSynthesizer's other arguments
    (the authors' code by default; `blend: paper` with `beta: [0.1, 1.0]` for the paper's eq. 2)."""

    model_class = DraemModel
    model: DraemModel
    best_epoch_monitor = ("val_synthetic_aupro", "max")

    def __init__(
        self,
        anomaly_source: str | None = None,
        synthesis: Mapping[str, Any] | None = None,
        synthesis_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.synthesis_seed = synthesis_seed
        source = str(Path(anomaly_source).expanduser()) if anomaly_source else None
        self.synthesizer = PerlinSynthesizer(source, **(synthesis or {}), seed=synthesis_seed)

    def on_fit_start(self) -> None:
        # Each DDP rank draws its own anomalies, reproducibly.
        self.synthesizer.reseed(self.synthesis_seed + self.global_rank)
        log.info("DRAEM anomalies: Perlin-shaped regions filled with %s", self.synthesizer.source.describe())

    def training_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        clean = self.synthesizer.rotate(batch.image)
        augmented, masks, _ = self.synthesizer(clean)
        return self.model.training_loss(clean, augmented, masks)
