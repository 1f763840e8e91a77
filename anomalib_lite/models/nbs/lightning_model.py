"""NBS as a LightningModule: the episode loop of neural batch sampling.

Every training step is one update of the patch autoencoder: the sampler scores the cells of the
batch's images (their current loss, its change, their visits this episode) and draws
`patches_per_step` of them; the autoencoder takes one step on those patches; the labelled
images' loss maps under the updated autoencoder enter the FIFO of profiles, and the predictor
takes one step on their profile against the labelled masks. After `episode_steps` updates the
episode ends: the sampler gets its REINFORCE step (reward: minus the predictor's loss on the
last profile, against a running-mean baseline), the last `history` autoencoder states become the
scoring snapshots, and the autoencoder starts again from new weights.

Labelled anomalies: `dataset.num_labelled_anomalies` images taken from the test split (the
paper's semi-supervised setting). Given none, NBS makes its own from `synthetic_labelled`
training images held out of the autoencoder's patches (Perlin anomalies, redrawn every episode;
the run says so): the method then runs without labels, e.g. in the framework's tests.
The epoch kept is the one with the best label-free validation AUPRO.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from anomalib_lite.data.batch import Batch
from anomalib_lite.engine import SynthesisTrainedModule
from anomalib_lite.models.nbs.episode import Episode
from anomalib_lite.models.nbs.torch_model import (
    NbsModel,
    balanced_bce,
    cell_crops,
    draw_cells,
    log_profile,
    squared_error_map,
)
from anomalib_lite.schema import PositiveInt

log = logging.getLogger(__name__)


class Nbs(SynthesisTrainedModule):
    """NbsModel's arguments; `episode_steps`: autoencoder updates per episode; `patches_per_step`:
    the autoencoder's batch; `synthetic_labelled`: held-out training images given synthetic
    anomalies when there are no labelled ones; `baseline_momentum`: of the reward's running mean.
    Optimisers "autoencoder", "predictor" and "sampler"."""

    model_class = NbsModel
    model: NbsModel
    uses_labelled_anomalies = True
    ddp_find_unused_parameters = True  # each optimiser's step leaves the other networks unused

    def __init__(
        self,
        episode_steps: PositiveInt = 20,
        patches_per_step: PositiveInt = 16,
        synthetic_labelled: PositiveInt = 8,
        baseline_momentum: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.episode_steps, self.patches_per_step = episode_steps, patches_per_step
        self.synthetic_labelled, self.baseline_momentum = synthetic_labelled, baseline_momentum
        self.labelled_images = self.labelled_masks = torch.zeros(0)
        self.held_out_images, self.held_out_index = torch.zeros(0), torch.zeros(0, dtype=torch.long)
        self.baseline: float | None = None
        self.episodes_done = 0
        self.episode = Episode(self.model.history, self.model.grid)

    def parameter_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        model = self.model
        return {
            "autoencoder": model.autoencoder.parameters(), "predictor": model.predictor.parameters(),
            "sampler": model.sampler.parameters(),
        }

    # -- the labelled set ---------------------------------------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        labelled = self.labelled_anomalies()
        if labelled is not None:
            self.labelled_images, self.labelled_masks = labelled
            log.info("NBS learns from %d labelled anomalous images (dataset.num_labelled_anomalies)", len(labelled[0]))
        else:
            self._hold_out_training_images()
            log.info(
                "NBS: no labelled anomalies (dataset.num_labelled_anomalies=0): %d training images are held out of the "
                "autoencoder's patches and given synthetic anomalies instead, redrawn every episode",
                len(self.held_out_images),
            )
        self.model.check_size(self.labelled_images if labelled is not None else self.held_out_images)
        self._start_episode()

    @torch.no_grad()
    def _hold_out_training_images(self) -> None:
        """The first `synthetic_labelled` training images the loader yields (at most half of them)."""
        total = len(self.trainer.train_dataloader.dataset)
        count = max(1, min(self.synthetic_labelled, total // 2))
        images, indices = [], []
        for batch in self.trainer.train_dataloader:
            images.append(batch.image)
            indices.append(batch.index)
            if sum(len(i) for i in indices) >= count:
                break
        self.held_out_images = torch.cat(images)[:count].to(self.device)
        self.held_out_index = torch.cat(indices)[:count].to(self.device)

    # -- episodes ---------------------------------------------------------------------------------
    def _start_episode(self) -> None:
        self.episode = Episode(self.model.history, self.model.grid)
        self.model.reset_autoencoder()
        self.optimizer("autoencoder").optimizer.state.clear()  # Adam's moments belong to the old weights
        if len(self.held_out_images):
            self.labelled_images, self.labelled_masks, _ = self.synthesizer(self.held_out_images)

    def _finish_episode(self, predictor_loss: float) -> None:
        reward = -predictor_loss
        baseline = reward if self.baseline is None else self.baseline
        if self.episode.log_probs:
            policy_loss = -(reward - baseline) * torch.stack(self.episode.log_probs).sum()
            self.step(self.optimizer("sampler"), policy_loss)
        self.baseline = self.baseline_momentum * baseline + (1 - self.baseline_momentum) * reward
        self.model.keep_snapshots(self.episode.autoencoder_states)
        self.episodes_done += 1
        self.log("train_reward", reward, on_step=False, on_epoch=True, batch_size=1)
        self._start_episode()

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        model, images, episode = self.model, batch.image, self.episode
        model.check_size(images)
        index = batch.index.tolist()
        with torch.no_grad():
            model.autoencoder.eval()
            cell_loss = model.cell_log_loss(squared_error_map(model.autoencoder, images))
            previous = episode.earlier_cell_loss(index, cell_loss)
            visits = episode.visit_counts(index, self.device)
        logits = model.sampler(model.cell_states(cell_loss, previous, visits))
        held_out = torch.isin(batch.index.to(self.device), self.held_out_index)
        autoencoder_loss = None
        if not bool(held_out.all()):
            cells, log_prob = draw_cells(logits, self.patches_per_step, held_out)
            episode.log_probs.append(log_prob)
            jitter = torch.rand(len(cells), 2, device=self.device) - 0.5
            patches = cell_crops(images, cells, model.grid, model.patch_size, jitter)
            model.autoencoder.train()
            autoencoder_loss = model.patch_loss(patches)
            self.step(self.optimizer("autoencoder"), autoencoder_loss)
            episode.record_draws(index, cells, self.device)
        episode.remember_losses(index, cell_loss)

        # The labelled images' loss maps under the updated autoencoder: the FIFO of profiles.
        with torch.no_grad():
            model.autoencoder.eval()
            state = {key: value.detach().clone() for key, value in model.autoencoder.state_dict().items()}
            episode.remember_step(squared_error_map(model.autoencoder, self.labelled_images), state)
        predictor_loss = balanced_bce(model.predictor(log_profile(episode.labelled_maps, model.history)), self.labelled_masks)
        self.step(self.optimizer("predictor"), predictor_loss)
        self.step_schedulers("step")

        size = len(batch)
        if autoencoder_loss is not None:
            self.log("train_loss", autoencoder_loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        self.log("train_predictor_loss", predictor_loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=size)
        episode.steps += 1
        if episode.steps >= self.episode_steps:
            self._finish_episode(float(predictor_loss.detach()))

    def on_validation_epoch_start(self) -> None:
        # Before the first episode has finished, score with the states the current one has.
        if self.episodes_done == 0 and self.episode.autoencoder_states and not self.trainer.sanity_checking:
            self.model.keep_snapshots(self.episode.autoencoder_states)
        super().on_validation_epoch_start()
