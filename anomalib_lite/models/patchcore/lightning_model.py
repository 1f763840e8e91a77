"""PatchCore as a LightningModule: one pass fills the memory bank, its coreset sampler thins it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate

from anomalib_lite.engine import MemoryBankModule
from anomalib_lite.models.patchcore.torch_model import PatchcoreModel


class Patchcore(MemoryBankModule):
    """`coreset_sampler` is a Hydra spec of the sampler (e.g. `GreedyCoresetSampler` with its
    ratio); the other arguments are PatchcoreModel's."""

    model_class = PatchcoreModel
    model: PatchcoreModel

    def build_model(self, backbone: Mapping | None, coreset_sampler: Mapping | None = None, **model_args: Any) -> PatchcoreModel:
        sampler = instantiate(dict(coreset_sampler)) if coreset_sampler is not None else None
        return PatchcoreModel(backbone=dict(backbone), coreset_sampler=sampler, **model_args)
