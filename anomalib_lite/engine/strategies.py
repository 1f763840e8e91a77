"""Lightning's DDP strategy, usable by methods with nothing to train (memory banks) and by
methods whose steps train one part of the model at a time (CFLOW's per-level fiber steps)."""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy
from torch import nn

from anomalib_lite.engine.module import AnomalyModule


class DDPStrategy(LightningDDPStrategy):
    """DDP that leaves a model without trainable parameters unwrapped.

    torch's DistributedDataParallel refuses such a model; memory-bank methods need DDP only for
    process groups, sharded data and collectives (all_gather, broadcast), which work unwrapped,
    exactly as Lightning already runs validation and test.
    A method with `ddp_find_unused_parameters = True` (some steps leave parameters unused) gets
    DDP's unused-parameter detection, which would otherwise stop the run.
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if not any(parameter.requires_grad for parameter in model.parameters()):
            return model
        if isinstance(model, AnomalyModule) and model.ddp_find_unused_parameters:
            self._ddp_kwargs["find_unused_parameters"] = True
        return super()._setup_model(model)
