"""The autoencoder as a LightningModule: the framework's training loop on its reconstruction loss."""

from __future__ import annotations

from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.ae.torch_model import AutoencoderModel


class Autoencoder(TrainedModule):
    """AutoencoderModel's arguments and the training settings (epochs, optimizers, schedulers)."""

    model_class = AutoencoderModel
    model: AutoencoderModel
