"""OGNet as a LightningModule: phase one (D step, then G step, per batch) for all but the last
`phase_two_epochs` epochs, G_old kept at the end of epoch `old_epoch`, then phase two (D alone at
`phase_two_lr`). The last epoch is kept: the scorer exists only once phase two has run."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from anomalib_lite.data.batch import Batch
from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components import TrainedModule
from anomalib_lite.models.ognet.torch_model import OgnetModel


class Ognet(TrainedModule):
    """OgnetModel's arguments, the phases (`old_epoch`, `phase_two_epochs`, `phase_two_lr`) and the
    optimisers "generator" and "discriminator"."""

    model_class = OgnetModel
    model: OgnetModel
    best_epoch_monitor = None
    ddp_find_unused_parameters = True  # phase two leaves the generator unused

    def __init__(self, old_epoch: int = 15, phase_two_epochs: int = 1, phase_two_lr: float = 5e-5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.old_epoch = old_epoch
        self.phase_two_epochs = phase_two_epochs
        self.phase_two_lr = phase_two_lr
        self.automatic_optimization = False  # two optimisers, and two phases

    def parameter_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        return {"generator": self.model.generator.parameters(), "discriminator": self.model.discriminator.parameters()}

    def on_fit_start(self) -> None:
        phase_one = self.trainer.max_epochs - self.phase_two_epochs
        if self.phase_two_epochs < 1 or not 1 <= self.old_epoch <= phase_one:
            raise UserInputError(
                f"OGNet needs 1 <= method.old_epoch ({self.old_epoch}) <= the phase-one epochs ({phase_one} = "
                f"{self.trainer.max_epochs} epochs - method.phase_two_epochs {self.phase_two_epochs}), and a phase two"
            )

    def in_phase_two(self) -> bool:
        return self.current_epoch >= self.trainer.max_epochs - self.phase_two_epochs

    def on_train_epoch_start(self) -> None:
        if self.in_phase_two():
            for group in self.optimizer("discriminator").param_groups:
                group["lr"] = self.phase_two_lr

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        size = len(batch)
        if self.in_phase_two():
            loss = self.model.phase_two_loss(batch.image)
            self.step(self.optimizer("discriminator"), loss)
            self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
            return
        discriminator_loss, generator_loss, terms = self.model.phase_one_losses(batch.image)
        self.step(self.optimizer("discriminator"), discriminator_loss)
        self.step(self.optimizer("generator"), generator_loss)
        self.step_schedulers("step")
        self.log("train_loss", generator_loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        self.log("train_discriminator_loss", discriminator_loss, on_step=False, on_epoch=True, batch_size=size)
        for name, value in terms.items():
            self.log(f"train_{name}", value, on_step=False, on_epoch=True, batch_size=size)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.current_epoch + 1 == self.old_epoch:
            self.model.keep_old_generator()
