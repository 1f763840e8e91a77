"""GANomaly as a LightningModule: per batch, one generator step then one discriminator step (the
authors' order), the discriminator re-initialised when its loss collapses below 1e-5. The epoch
kept is the one with the best label-free validation image AUROC (held-out normal images with
synthetic anomalies): GANomaly scores images."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.ganomaly.torch_model import GanomalyModel


class Ganomaly(TrainedModule):
    """GanomalyModel's arguments; optimisers "generator" and "discriminator" (the paper: Adam 2e-4,
    beta1 0.5, for both); `collapse_threshold`: the discriminator loss below which it is re-initialised."""

    model_class = GanomalyModel
    model: GanomalyModel
    best_epoch_monitor = ("val_synthetic_image_auroc", "max")
    ddp_find_unused_parameters = True  # the generator's step does not use the discriminator's classifier

    def __init__(self, collapse_threshold: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.collapse_threshold = collapse_threshold
        self.automatic_optimization = False  # two optimisers, alternating

    def parameter_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        return {"generator": self.model.generator_parameters(), "discriminator": self.model.discriminator.parameters()}

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        terms, real, fake = self.model.generator_terms(batch.image)
        self.step(self.optimizer("generator"), terms["loss"])
        discriminator_loss = self.model.discriminator_loss(real, fake.detach())
        self.step(self.optimizer("discriminator"), discriminator_loss)
        if float(discriminator_loss.detach()) < self.collapse_threshold:
            self.model.reinitialize_discriminator()
        self.step_schedulers("step")
        size = len(batch)
        self.log("train_loss", terms["loss"], prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        self.log("train_discriminator_loss", discriminator_loss, on_step=False, on_epoch=True, batch_size=size)
        for name in ("adversarial", "contextual", "encoder"):
            self.log(f"train_{name}", terms[name], on_step=False, on_epoch=True, batch_size=size)
