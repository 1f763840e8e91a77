"""Reverse Distillation as a LightningModule: the framework's loop over the model's loss, which
trains the bottleneck embedding and the decoder (the encoder is frozen)."""

from __future__ import annotations

from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.reverse_distillation.torch_model import ReverseDistillationModel


class ReverseDistillation(TrainedModule):
    """ReverseDistillationModel's arguments (levels, bottleneck_blocks, decoder_blocks, hidden_ratio,
    loss, blur_sigma) and the training settings from the method's config."""

    model_class = ReverseDistillationModel
