"""STFPM as a LightningModule: the framework's loop over StfpmModel's loss; the epoch with the
lowest loss on the held-out normal images is kept (as the authors' code does)."""

from __future__ import annotations

from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.stfpm.torch_model import StfpmModel


class Stfpm(TrainedModule):
    """StfpmModel's arguments (levels, loss_factor) and the training settings from the method's config."""

    model_class = StfpmModel
