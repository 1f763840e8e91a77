"""FastFlow as a LightningModule: the framework's loop over FastflowModel's loss."""

from __future__ import annotations

from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.fastflow.torch_model import FastflowModel


class Fastflow(TrainedModule):
    """FastflowModel's arguments (levels, flow_steps, hidden_ratio, conv3x3_only, clamp) and the
    training settings (epochs, optimizers, schedulers) from the method's config."""

    model_class = FastflowModel
