"""CS-Flow as a LightningModule: the framework's loop over CsFlowModel's loss."""

from __future__ import annotations

from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.cs_flow.torch_model import CsFlowModel


class CsFlow(TrainedModule):
    """CsFlowModel's arguments (levels, coupling_blocks, hidden_channels, kernel_sizes, clamp,
    normalize_features) and the training settings from the method's config."""

    model_class = CsFlowModel
