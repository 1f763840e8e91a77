"""OGNet as a LightningModule: phase one (a D step, then a G step, per batch) for every epoch, G_old
kept after `old_fraction` of its steps, then phase two at the end of the last epoch (D alone, at
`phase_two_lr`, for `phase_two_steps` batches). The last epoch is kept: phase two makes the scorer."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Annotated, Any

import torch
from torch import nn

from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.ognet.torch_model import OgnetModel
from anomalib_lite.schema import Fraction, PositiveInt


class Ognet(TrainedModule):
    """OgnetModel's arguments, the phases (`old_fraction`, `phase_two_steps`, `phase_two_lr`) and the
    optimisers "generator" and "discriminator"."""

    model_class = OgnetModel
    model: OgnetModel
    best_epoch_monitor = None
    ddp_find_unused_parameters = True  # phase two leaves the generator unused

    def __init__(
        self, old_fraction: Annotated[float, Fraction] = 0.6, phase_two_steps: PositiveInt = 75, phase_two_lr: float = 5e-5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.old_fraction = old_fraction
        self.phase_two_steps = phase_two_steps
        self.phase_two_lr = phase_two_lr
        self.automatic_optimization = False  # two optimisers, and two phases

    def parameter_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        return {"generator": self.model.generator.parameters(), "discriminator": self.model.discriminator.parameters()}

    def _old_step(self) -> int:
        """The phase-one step (1-based) after which G_old is kept."""
        total = int(self.trainer.num_training_batches) * int(self.trainer.max_epochs)
        return max(1, round(self.old_fraction * total))

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        size = len(batch)
        discriminator_loss, generator_loss, terms = self.model.phase_one_losses(batch.image)
        self.step(self.optimizer("discriminator"), discriminator_loss)
        self.step(self.optimizer("generator"), generator_loss)
        self.step_schedulers("step")
        if self.current_epoch * int(self.trainer.num_training_batches) + batch_idx + 1 == self._old_step():
            self.model.keep_old_generator()
        self.log("train_loss", generator_loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        self.log("train_discriminator_loss", discriminator_loss, on_step=False, on_epoch=True, batch_size=size)
        for name, value in terms.items():
            self.log(f"train_{name}", value, on_step=False, on_epoch=True, batch_size=size)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.current_epoch + 1 == self.trainer.max_epochs:
            self.phase_two()

    def phase_two(self) -> None:
        """D alone on good (x, G(x)) against poor (G_old(x), pseudo anomalies) reconstructions."""
        optimizer = self.optimizer("discriminator")
        for group in optimizer.param_groups:
            group["lr"] = self.phase_two_lr
        losses = []
        batches = itertools.islice(itertools.cycle(self.trainer.train_dataloader), self.phase_two_steps)
        for batch in self.track(batches, "OGNet phase two"):
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            loss = self.model.phase_two_loss(batch.image)
            self.step(optimizer, loss)
            losses.append(loss.detach())
        self.model.generator.train()  # phase_two_loss fixed it in eval mode
        self.log("train_phase_two_loss", torch.stack(losses).mean(), on_step=False, on_epoch=True, batch_size=1)
