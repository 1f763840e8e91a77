"""AnoGAN as a LightningModule: DCGAN training, one discriminator step then one generator step per
batch (Radford et al.'s order); the epoch kept is the one with the best label-free validation
image AUROC (held-out normal images with synthetic anomalies, scored by the latent search)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.anogan.torch_model import AnoGanModel


class AnoGan(TrainedModule):
    """AnoGanModel's arguments; optimisers "generator" and "discriminator" (DCGAN: Adam 2e-4, beta1 0.5)."""

    model_class = AnoGanModel
    model: AnoGanModel
    best_epoch_monitor = ("val_synthetic_image_auroc", "max")
    ddp_find_unused_parameters = True  # the discriminator's step does not use the generator, and back

    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.automatic_optimization = False  # two optimisers, alternating

    def parameter_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        return {"generator": self.model.generator.parameters(), "discriminator": self.model.discriminator.parameters()}

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        real = batch.image * 2 - 1
        fake = self.model.generator(self.model.sample_latents(len(real)))
        discriminator_loss = self.model.discriminator_loss(real, fake.detach())
        self.step(self.optimizer("discriminator"), discriminator_loss)
        generator_loss, _ = self.model.generator_loss(len(real))
        self.step(self.optimizer("generator"), generator_loss)
        self.step_schedulers("step")
        size = len(batch)
        self.log("train_loss", generator_loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        self.log("train_discriminator_loss", discriminator_loss, on_step=False, on_epoch=True, batch_size=size)
