"""Patch SVDD as a LightningModule: the authors' loop of steps of `pairs_per_step` pairs, each
training image drawn `pairs_per_image` times per epoch; the banks of training patch features are
rebuilt before every validation (`FittedOnEmbeddings`), and the epoch with the best label-free
validation image AUROC is kept (the authors evaluated every epoch on the test set)."""

from __future__ import annotations

from typing import Any

import torch

from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import TrainedModule
from anomalib_lite.models.patch_svdd.torch_model import PatchSvddModel
from anomalib_lite.schema import PositiveInt

TERMS = ("ssl_64", "ssl_32", "svdd_64", "svdd_32")


class PatchSvdd(TrainedModule):
    """PatchSvddModel's arguments; `pairs_per_image`: how often each training image is drawn per
    epoch (the authors' 100: their epoch repeats the training set 100 times); `pairs_per_step`:
    pairs of each kind per optimiser step (their batch, 64); `sampling_seed`: the patch positions,
    offsets and noise."""

    model_class = PatchSvddModel
    model: PatchSvddModel
    best_epoch_monitor = ("val_synthetic_image_auroc", "max")

    def __init__(
        self, pairs_per_image: PositiveInt = 100, pairs_per_step: PositiveInt = 64, sampling_seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.pairs_per_image, self.pairs_per_step = pairs_per_image, pairs_per_step
        self.sampling_seed = sampling_seed
        self.generator = torch.Generator().manual_seed(sampling_seed)

    def on_fit_start(self) -> None:
        # Each DDP rank draws its own pairs, reproducibly.
        self.generator.manual_seed(self.sampling_seed + 1000 * self.global_rank)

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        # Every image of the batch, pairs_per_image times, in random order, in steps of pairs_per_step.
        draws = torch.arange(len(batch)).repeat(self.pairs_per_image)
        draws = draws[torch.randperm(len(draws), generator=self.generator)]
        optimizer = self.optimizer("model")
        totals = dict.fromkeys(("loss", *TERMS), 0.0)
        steps = draws.split(self.pairs_per_step)
        for which in steps:
            terms = self.model.loss_terms(batch.image, which, self.generator)
            self.step(optimizer, terms["loss"])
            self.step_schedulers("step")
            for key in totals:
                totals[key] += float(terms[key].detach()) / len(steps)
        size = len(batch)
        self.log("train_loss", totals["loss"], prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        for key in TERMS:
            self.log(f"train_{key}", totals[key], on_step=False, on_epoch=True, batch_size=size)
