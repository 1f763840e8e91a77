"""The base of methods fitted by gradient descent: optimisers and schedulers from the method's
config, the best epoch by a validation signal (no test label), and the passes over the images some
models need before training or validation (statistics, calibration, refitting their density)."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from anomalib_lite.data.anomaly_synthesis import PerlinSynthesizer
from anomalib_lite.data.batch import Batch
from anomalib_lite.data.datamodule import AnomalyDataModule
from anomalib_lite.engine.module import AnomalyModule, gather_rows
from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.interfaces import (
    CalibratedOnNormalImages,
    Embeddings,
    FittedOnEmbeddings,
    PreparedOnTrainingImages,
    TrainableModel,
)
from anomalib_lite.schema import PositiveInt

log = logging.getLogger(__name__)

# A run's checkpoints: <run>/checkpoints/model.ckpt (the one a run keeps) and, for trained methods, best_epoch.ckpt.
CHECKPOINT_DIR = "checkpoints"


class TrainedModule(AnomalyModule):
    """Methods fitted by gradient descent for `epochs` epochs on normal images.

    Optimisers: `optimizers` maps a name to a Hydra `_partial_` spec (e.g. torch.optim.Adam with
    its lr); `parameter_groups()` maps the same names to the parameters each one updates (by
    default one group, "model": every trainable parameter of the torch model). `schedulers`
    optionally maps names to `_partial_` scheduler specs (an `interval: step` entry steps it per
    optimiser step instead of per epoch). With one optimiser the loop is Lightning's automatic
    one over `training_loss`; a method with several (a generator and a discriminator) turns
    `automatic_optimization` off and writes its loop with `optimizer(name)` and `step()`.
    `gradient_clip_norm` clips the gradient norm before every step.

    After every epoch `val_loss` (the torch model's loss on the held-out normal images) is
    measured; the run keeps the weights of the epoch with the best `best_epoch_monitor` (a
    Lightning `ModelCheckpoint` this module adds itself) and tests those, not the last epoch's.
    A method may monitor a label-free `val_synthetic_*` metric instead (without a synthetic
    validation view, `dataset.val_synthesis: null`, it falls back to `val_loss`), or None: the
    last epoch is kept (a method whose last phase makes the scorer, e.g. OGNet's).
    `keep_epoch="last"` keeps the last epoch of any method (what a library without model selection
    tests, e.g. anomalib's engine: `+method.keep_epoch=last` in the peer comparison).
    An explicit `trainer.max_epochs` overrides `epochs`.
    """

    model_class: type[TrainableModel]
    model: TrainableModel
    best_epoch_monitor: tuple[str, str] | None = ("val_loss", "min")

    def __init__(
        self,
        epochs: PositiveInt,
        optimizers: Mapping[str, Mapping[str, Any]],
        schedulers: Mapping[str, Mapping[str, Any]] | None = None,
        gradient_clip_norm: float | None = None,
        keep_epoch: Literal["best", "last"] = "best",
        backbone: Mapping[str, Any] | None = None,
        **model_args: Any,
    ) -> None:
        # Settings first: a mistake is reported before the backbone is loaded (types and bounds: `__new__`).
        if not optimizers:
            raise UserInputError("method.optimizers is empty: a trained method needs at least one optimiser")
        unknown = set(schedulers or {}) - set(optimizers)
        if unknown:
            raise UserInputError(
                f"method.schedulers names {sorted(unknown)}, which are not optimisers ({sorted(optimizers)})"
            )
        super().__init__(backbone, **model_args)
        self.save_hyperparameters()
        self.epochs = epochs
        self.optimizer_specs = {name: dict(spec) for name, spec in optimizers.items()}
        self.scheduler_specs = {name: dict(spec) for name, spec in (schedulers or {}).items()}
        self.gradient_clip_norm = gradient_clip_norm
        self.keep_epoch = keep_epoch
        self._optimizer_names: list[str] = []

    def trainer_settings(self, requested: Mapping[str, Any]) -> dict[str, Any]:
        # Validation after every epoch: it scores the epoch and refits the thresholds.
        settings: dict[str, Any] = {"num_sanity_val_steps": 0, "check_val_every_n_epoch": 1}
        if requested.get("max_epochs") is None:
            settings["max_epochs"] = self.epochs
        elif requested["max_epochs"] != self.epochs:
            log.info("trainer.max_epochs=%s overrides method.epochs=%d", requested["max_epochs"], self.epochs)
        return settings

    def configure_callbacks(self) -> list[Callback]:
        monitor, mode = (self.best_epoch_monitor if self.keep_epoch == "best" else None) or (None, "min")
        datamodule = self.trainer.datamodule
        synthetic_view = not isinstance(datamodule, AnomalyDataModule) or datamodule.val_synthesis is not None
        if monitor is not None and monitor.startswith("val_synthetic_") and not synthetic_view:
            log.info("dataset.val_synthesis is null: the best epoch is chosen by val_loss instead of %s", monitor)
            monitor, mode = "val_loss", "min"
        return [
            ModelCheckpoint(
                dirpath=Path(self.trainer.default_root_dir) / CHECKPOINT_DIR, filename="best_epoch", monitor=monitor,
                mode=mode, save_top_k=1, save_weights_only=True, enable_version_counter=False,
            )
        ]

    # -- optimisers and schedulers from the config ------------------------------------------------
    def parameter_groups(self) -> dict[str, Iterable[nn.Parameter]]:
        """Optimiser name -> the parameters it updates. One group by default."""
        return {"model": (p for p in self.model.parameters() if p.requires_grad)}

    def build_optimizer(self, name: str, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The configured optimiser `name` over `parameters`.

        Adam and AdamW use torch's fused kernel where it applies (one op per step instead of ~10
        per tensor: the same update rule, and ~20 % of a CFLOW fiber step on CPU), unless the spec
        sets `fused` itself.
        """
        if name not in self.optimizer_specs:
            raise UserInputError(
                f"method.optimizers has no '{name}' (it has: {', '.join(sorted(self.optimizer_specs))})"
            )
        spec = {**self.optimizer_specs[name], "_partial_": True}
        parameters = list(parameters)
        if spec["_target_"] in ("torch.optim.Adam", "torch.optim.AdamW") and "fused" not in spec:
            fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters)
            spec["fused"] = fused or None
        return instantiate(spec)(parameters)

    def build_scheduler(self, name: str, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The configured scheduler of optimiser `name`, as Lightning's lr_scheduler config (or None).

        A scheduler factory with a `total_steps` (`total_epochs`) argument the spec leaves out gets
        the run's number of training batches (epochs): e.g. `schedules.warmup_cosine`,
        `schedules.multistep_at_fractions`.
        """
        if name not in self.scheduler_specs:
            return None
        spec = {**self.scheduler_specs[name], "_partial_": True}
        interval = spec.pop("interval", "epoch")
        factory = instantiate(spec)
        parameters = inspect.signature(factory).parameters
        if "total_steps" in parameters and "total_steps" not in spec:
            factory = functools.partial(factory, total_steps=int(self.trainer.estimated_stepping_batches))
        if "total_epochs" in parameters and "total_epochs" not in spec:
            factory = functools.partial(factory, total_epochs=int(self.trainer.max_epochs))
        return {"scheduler": factory(optimizer), "interval": interval}

    def configure_optimizers(self) -> list[dict[str, Any]]:
        groups = self.parameter_groups()
        if set(groups) != set(self.optimizer_specs):
            raise UserInputError(
                f"method.optimizers names {sorted(self.optimizer_specs)}, but {type(self).__name__} "
                f"optimises {sorted(groups)}"
            )
        self._optimizer_names = list(groups)
        if len(groups) > 1 and self.automatic_optimization:
            raise TypeError(f"{type(self).__name__} has several optimisers: its training loop must be manual")
        configured = []
        for name, parameters in groups.items():
            optimizer = self.build_optimizer(name, parameters)
            scheduler = self.build_scheduler(name, optimizer)
            configured.append({"optimizer": optimizer} | ({"lr_scheduler": scheduler} if scheduler else {}))
        return configured

    def optimizer(self, name: str) -> L.pytorch.core.optimizer.LightningOptimizer:
        """The optimiser configured under `name` (manual loops)."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        return optimizers[self._optimizer_names.index(name)]

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """One manual optimisation step: zero the gradients, backward, clip, step."""
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.gradient_clip_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_norm, gradient_clip_algorithm="norm")
        optimizer.step()

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:  # noqa: ANN001
        if self.gradient_clip_norm is not None:
            gradient_clip_val, gradient_clip_algorithm = self.gradient_clip_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def step_schedulers(self, interval: str) -> None:
        """Step the schedulers configured with this interval ("step" or "epoch"). Lightning does
        it in automatic mode; manual loops call it per batch, and per epoch it happens here."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval == interval:
                config.scheduler.step()

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization:
            self.step_schedulers("epoch")

    # -- the loop ------------------------------------------------------------------------------------
    def training_loss(self, batch: Batch) -> torch.Tensor | dict[str, torch.Tensor]:
        """The objective on a training batch; a dict holds "loss" and further terms to log."""
        return self.model.loss(batch.image)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        terms = self.training_loss(batch)
        terms = terms if isinstance(terms, dict) else {"loss": terms}
        size = len(batch)
        self.log("train_loss", terms["loss"], prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        for key, value in terms.items():
            if key != "loss":
                self.log(f"train_{key}", value, on_step=False, on_epoch=True, batch_size=size)
        return terms["loss"]

    def on_train_start(self) -> None:
        # Here, not in on_fit_start: Lightning sets up the training loader between the two.
        if isinstance(self.model, PreparedOnTrainingImages):
            statistics = self.gather_over(
                self.trainer.train_dataloader, self.model.preparation_statistics, what="statistics over the training images"
            )
            self.model.prepare(statistics)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        if self.trainer.sanity_checking:
            return
        if isinstance(self.model, FittedOnEmbeddings) and self.trainer.state.fn == "fit":
            self.fit_on_training_images()
        if isinstance(self.model, CalibratedOnNormalImages):
            loader = self.trainer.val_dataloaders
            loader = loader[0] if isinstance(loader, list) else loader
            maps = self.gather_over(loader, self.model.calibration_maps, normal_only=True, what="calibration on held-out normal images")
            if not len(maps):
                raise UserInputError(f"{type(self).__name__} calibrates its scores on held-out normal images, and the validation set has none")
            self.model.calibrate(maps)

    @torch.no_grad()
    def fit_on_training_images(self) -> None:
        """Embed every training image with the current weights (eval mode) and fit the model on them."""
        self.model.fit(self.gather_over(self.trainer.train_dataloader, self.model.embed, what="embedding the training images"))

    @torch.no_grad()
    def gather_over(
        self, loader: Iterable[Batch], compute: Callable[[torch.Tensor], Embeddings], normal_only: bool = False,
        what: str = "pass over the images",
    ) -> Embeddings:
        """`compute` on every image of `loader` (eval mode, no gradients), concatenated in dataset order
        (per name, when `compute` returns named tensors).

        Under DDP each rank computes its share; the results are gathered in dataset order, so
        every rank holds what a single process would. `normal_only`: only images labelled normal.
        These passes sit outside Lightning's loops: the run's progress display shows them on rank 0
        under the name `what` (`track`).
        """
        was_training = self.model.training
        self.model.eval()
        rows, indices = [], []
        for batch in self.track(loader, what):
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            keep = batch.label == 0 if normal_only else torch.ones_like(batch.label, dtype=torch.bool)
            if bool(keep.any()):
                rows.append(compute(batch.image[keep]))
                indices.append(batch.index.to(self.device)[keep.to(self.device)])
        self.model.train(was_training)
        if not rows:
            return torch.zeros(0, device=self.device)
        return gather_rows(self, rows, torch.cat(indices))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        normal = batch.label == 0
        count = int(normal.sum())
        loss = self.model.loss(batch.image[normal]) if count else batch.image.new_zeros(())
        # Logged by every rank at every step, with weight 0 where a batch holds no normal image: a
        # DDP rank may receive only synthetic ones, and every rank must sync the same metrics.
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=count)


class SynthesisTrainedModule(TrainedModule):
    """A trained method that learns from Perlin-shaped synthetic anomalies (DRAEM, CPR).

    `anomaly_source`: a folder of texture images (the papers: DTD), or null for the package's
    procedural textures; `synthesis`: `PerlinSynthesizer`'s other arguments; `synthesis_seed`:
    its seed (each DDP rank draws its own anomalies from seed + rank). The epoch kept is the one
    with the best label-free validation AUPRO, unless the method says otherwise.
    """

    best_epoch_monitor = ("val_synthetic_aupro", "max")

    def __init__(
        self,
        anomaly_source: str | None = None,
        synthesis: Mapping[str, Any] | None = None,
        synthesis_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.synthesis_seed = synthesis_seed
        source = str(Path(anomaly_source).expanduser()) if anomaly_source else None
        self.synthesizer = PerlinSynthesizer(source, **self.synthesis_settings(dict(synthesis or {})), seed=synthesis_seed)

    def synthesis_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The synthesiser's arguments from the config's (a method may adjust them to its model)."""
        return settings

    def on_fit_start(self) -> None:
        self.synthesizer.reseed(self.synthesis_seed + self.global_rank)
        log.info("%s anomalies: Perlin-shaped regions filled with %s", type(self).__name__, self.synthesizer.source.describe())
