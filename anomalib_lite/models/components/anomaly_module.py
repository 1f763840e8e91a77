"""Base LightningModules shared by every method.

`AnomalyModule` owns what is the same for all methods. Validation runs on held-out *normal*
images and on synthetic anomalies made from them (`data.ValidationSet`): the normal images fit the
image/pixel thresholds and the heatmap colour scale (buffers, so they travel in the checkpoint),
the synthetic ones give label-free metrics for model selection (`val_synthetic_*`). Test steps
return one `AnomalyOutput` per batch to the callbacks.

`MemoryBankModule` adds the one-pass fitting of memory-bank methods (PatchCore, PaDiM);
`TrainedModule` the optimisation of trained methods: optimisers and schedulers come from the
method's config (`optimizers:` / `schedulers:`, Hydra `_partial_` specs, any number of them), and
the epoch kept is the one with the best validation signal (no test label involved).
`SynthesisTrainedModule` adds the Perlin anomaly synthesiser that DRAEM and CPR train on (and NBS
falls back on when it is given no labelled anomalies).

A method's LightningModule names its torch model (`model_class`; `build_model` when building it
takes more than passing the config through) and declares what it needs instead of being
inspected: `train_shuffle`, `ddp_find_unused_parameters`, `trainer_settings()` (settings it must
impose on the trainer) and its own callbacks (`configure_callbacks()`, Lightning's hook).
The constructor takes the method's config: `backbone` (only methods built on a pretrained
feature extractor have one) and the torch model's arguments; trained methods also their
training settings. Everything is saved as hyperparameters, so a checkpoint rebuilds the method.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from anomalib_lite import metrics
from anomalib_lite.data.anomaly_synthesis import PerlinSynthesizer
from anomalib_lite.data.batch import Batch
from anomalib_lite.data.samples import ImageResize
from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.anomaly_map import AnomalyOutput
from anomalib_lite.models.components.interfaces import (
    AnomalyModel,
    CalibratedOnNormalImages,
    Embeddings,
    FittedOnEmbeddings,
    MemoryBankModel,
    PreparedOnTrainingImages,
    TrainableModel,
)
from anomalib_lite.schema import PositiveInt
from anomalib_lite.utils.distributed import gather_samples

log = logging.getLogger(__name__)

# The label-free selection metrics, computed on the synthetic validation view after each validation.
VALIDATION_METRICS = ("val_synthetic_image_auroc", "val_synthetic_pixel_auroc", "val_synthetic_aupro")
COLOUR_SCALE_QUANTILE = 0.999  # of the validation maps: the top of the heatmaps' colour scale


def gather_rows(module: L.LightningModule, rows: list[Embeddings], index: torch.Tensor) -> Embeddings:
    """Per-batch results (tensors, or dicts of named tensors) -> one result over all DDP ranks, in
    dataset order, of the same kind."""
    if isinstance(rows[0], dict):
        return gather_samples(module, {key: torch.cat([row[key] for row in rows]) for key in rows[0]}, index)
    return gather_samples(module, {"row": torch.cat(rows)}, index)["row"]


class AnomalyModule(L.LightningModule):
    model_class: type[AnomalyModel]
    model: AnomalyModel
    # Shuffle the training images (the data module asks; memory banks read them once, in order).
    train_shuffle: bool = True
    # DDP: some training steps leave parameters unused (e.g. one flow per step).
    ddp_find_unused_parameters: bool = False
    # Semi-supervised: learns from the data module's labelled anomalous images (`labelled_anomalies()`).
    uses_labelled_anomalies: bool = False

    def __init__(self, backbone: Mapping[str, Any] | None = None, **model_args: Any) -> None:
        super().__init__()
        self.model = self.build_model(backbone, **model_args)
        nan = float("nan")
        self.register_buffer("image_threshold", torch.tensor(nan))
        self.register_buffer("pixel_threshold", torch.tensor(nan))
        self.register_buffer("pixel_floor", torch.tensor(nan))
        self.register_buffer("pixel_ceiling", torch.tensor(nan))
        self.validation_results: dict[str, float | None] = {}
        self._val_rows: dict[str, list[torch.Tensor]] = {}
        # The run's resize and crop: set by the run, stored in the checkpoint, applied by forward().
        self.image_resize: ImageResize | None = None

    def build_model(self, backbone: Mapping[str, Any] | None, **model_args: Any) -> AnomalyModel:
        """The torch model: `model_class` with the config's arguments (and the backbone, if any)."""
        if backbone is not None:
            model_args["backbone"] = dict(backbone)
        return self.model_class(**model_args)

    def trainer_settings(self, requested: Mapping[str, Any]) -> dict[str, Any]:
        """Trainer settings this method must have, given the trainer config (`requested`).

        The run applies them over the config and logs every explicit setting it replaces.
        """
        return {}

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        """Score images as the run scored its test images (the Python API).

        `images`: B x 3 x H x W or 3 x H x W RGB, uint8 or float in [0, 1], of any size: they are
        resized and cropped as in the run (`image_resize`, from the checkpoint); the backbone's
        normalisation is part of the torch model. Maps come at the model's input size (after crop).
        """
        return self.model(self.preprocess(images))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Checked, resized, float in [0, 1] on the model's device; see `forward`."""
        if not isinstance(images, torch.Tensor):
            raise UserInputError(f"images must be a torch.Tensor (B x 3 x H x W), got {type(images).__name__}")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4 or images.shape[1] != 3:
            hint = (
                "; channels last? use images.permute(0, 3, 1, 2)" if images.ndim == 4 and images.shape[-1] == 3
                else "; a grey image: images.expand(-1, 3, -1, -1)" if images.ndim == 4 and images.shape[1] == 1 else ""
            )
            raise UserInputError(f"images must be RGB, B x 3 x H x W or 3 x H x W; got shape {tuple(images.shape)}{hint}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise UserInputError(f"images must be uint8 (0-255) or float in [0, 1], got {images.dtype}")
        if images.is_floating_point() and images.numel():
            low, high = float(images.min()), float(images.max())
            if low < 0 or high > 1:
                raise UserInputError(
                    f"float images must lie in [0, 1], got values from {low:.4g} to {high:.4g}: divide 0-255 data by "
                    "255 or pass it as uint8 (ImageNet-normalised input is normalised again by the model: pass raw images)"
                )
        images = images.to(self.device)
        images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return self.image_resize.resize_batch(images) if self.image_resize is not None else images

    @torch.no_grad()
    def labelled_anomalies(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The data module's labelled anomalous images and masks (`dataset.num_labelled_anomalies`,
        N x 3 x H x W and N x H x W on this module's device), or None where it has none."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if not getattr(datamodule, "labelled_samples", None):
            return None
        batches = list(datamodule.labelled_dataloader())
        images = torch.cat([batch.image for batch in batches]).to(self.device)
        return images, torch.cat([batch.mask for batch in batches]).to(self.device)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, map_location: str | torch.device | None = None, **overrides: Any
    ) -> AnomalyModule:
        """Lightning's loader, made safe: the file is read as data only and what it names is checked
        before anything is built (`anomalib_lite.checkpoint.load_model`, which this calls); keyword
        arguments change the method's stored arguments. Returns the method in eval mode."""
        from anomalib_lite.checkpoint import load_model  # the layer above: it builds methods from files

        model = load_model(checkpoint_path, map_location or "cpu", overrides=overrides)
        if not isinstance(model, cls):
            raise UserInputError(f"{checkpoint_path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What a checkpoint needs beyond the weights to be used alone (`anomalib_lite.predict`).
        checkpoint["anomalib_lite"] = {
            "method_class": f"{type(self).__module__}.{type(self).__qualname__}",
            "preprocessing": self.image_resize.settings() if self.image_resize is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the colour scale had a top: the old scale (see `colour_scale`).
        checkpoint.get("state_dict", {}).setdefault("pixel_ceiling", torch.tensor(float("nan")))
        settings = checkpoint.get("anomalib_lite", {}).get("preprocessing")
        self.image_resize = ImageResize(**settings) if settings else None

    # -- validation: thresholds from normal images, selection metrics from synthetic anomalies ---
    def on_validation_epoch_start(self) -> None:
        self._val_rows = {key: [] for key in ("score", "map", "label", "mask", "index")}

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        output = self.model(batch.image)
        rows = self._val_rows
        rows["score"].append(output.pred_score.detach().float().cpu())
        rows["map"].append(output.anomaly_map.detach().float().cpu())
        rows["label"].append(batch.label.cpu())
        rows["mask"].append(batch.mask.cpu().to(torch.uint8))
        rows["index"].append(batch.index.cpu())

    def on_validation_epoch_end(self) -> None:
        if not self._val_rows.get("index"):
            return
        index = torch.cat(self._val_rows.pop("index"))
        gathered = gather_samples(self, {key: torch.cat(value) for key, value in self._val_rows.items()}, index)
        self._val_rows = {}
        normal = gathered["label"] == 0
        self.fit_thresholds(gathered["score"][normal], gathered["map"][normal])
        self.fit_colour_scale(gathered["map"])
        if bool((~normal).any()):
            results = metrics.compute_metrics(
                gathered["score"], gathered["label"], gathered["map"], gathered["mask"], with_f1=False
            )
            values = (results["image_auroc"], results["pixel_auroc"], results["pixel_aupro"])
            self.validation_results = dict(zip(VALIDATION_METRICS, values))
            # Computed from the gathered set: every rank holds the same values.
            self.log_dict({k: float(v) for k, v in self.validation_results.items() if v is not None}, sync_dist=False)

    @torch.no_grad()
    def fit_thresholds(self, normal_scores: torch.Tensor, normal_maps: torch.Tensor) -> None:
        """Thresholds = the largest score seen on held-out normal data (no false positive there).

        The colour scale's bottom is the median normal pixel; its middle, the pixel threshold.
        """
        self.image_threshold.fill_(float(normal_scores.max()))
        self.pixel_threshold.fill_(float(normal_maps.max()))
        self.pixel_floor.fill_(float(normal_maps.flatten().median()))

    @torch.no_grad()
    def fit_colour_scale(self, validation_maps: torch.Tensor) -> None:
        """The top of the heatmaps' colour scale: the 99.9th percentile of every validation map, the
        held-out normal images and their synthetic anomalies (no test label), so that defects scoring
        like the synthetic ones show their shape instead of saturating; at least as high as the
        symmetric scale (threshold + (threshold - floor)) it replaces."""
        values = validation_maps.flatten().float()
        top = float(values.kthvalue(max(1, math.ceil(COLOUR_SCALE_QUANTILE * values.numel()))).values)
        self.pixel_ceiling.fill_(max(top, float(2 * self.pixel_threshold - self.pixel_floor)))

    def colour_scale(self) -> tuple[float, float, float]:
        """(bottom, middle = pixel threshold, top) of the heatmaps' colour scale, in the map's units."""
        if torch.isnan(self.pixel_threshold):
            raise RuntimeError("normalisation is not fitted: run validation before test")
        floor, threshold = float(self.pixel_floor), float(self.pixel_threshold)
        top = float(self.pixel_ceiling)
        if math.isnan(top) or top <= threshold:  # checkpoints from before the top was fitted
            top = 2 * threshold - floor
        return floor, threshold, top

    def normalize_anomaly_map(self, anomaly_map: torch.Tensor, top: float | None = None) -> torch.Tensor:
        """Map scores onto [0, 1] with the validation-fitted scale (same for every test image):
        piecewise linear, the floor to 0, the pixel threshold to 0.5, the top (`colour_scale`'s, or
        the one given) to 1."""
        floor, threshold, fitted_top = self.colour_scale()
        top = fitted_top if top is None else top
        below = (anomaly_map - floor) / max(threshold - floor, 1e-12) * 0.5
        above = 0.5 + (anomaly_map - threshold) / max(top - threshold, 1e-12) * 0.5
        return torch.where(anomaly_map <= threshold, below, above).clamp(0, 1)

    # -- test and predict: one AnomalyOutput per batch, consumed by the callbacks ----------------
    def test_step(self, batch: Batch, batch_idx: int) -> AnomalyOutput:
        return self.model(batch.image)

    def predict_step(self, batch: Batch, batch_idx: int) -> AnomalyOutput:
        return self.model(batch.image)


class MemoryBankModule(AnomalyModule):
    """One pass over the normal images, no optimizer; the torch model is fitted at epoch end.

    Training steps collect the model's per-image embeddings with their dataset indices; at the end
    of the epoch they are gathered from every DDP rank in dataset order, so the fitted statistics
    (or memory bank) are the same as a single process would build.
    """

    model_class: type[MemoryBankModel]
    model: MemoryBankModel
    train_shuffle = False

    def __init__(self, backbone: Mapping[str, Any] | None = None, **model_args: Any) -> None:
        super().__init__(backbone, **model_args)
        self.save_hyperparameters()
        # Nothing to optimise: manual mode runs training_step as a plain loop body (also under DDP).
        self.automatic_optimization = False
        self._train_embeddings: list[Embeddings] = []
        self._train_index: list[torch.Tensor] = []

    def trainer_settings(self, requested: Mapping[str, Any]) -> dict[str, Any]:
        # A single pass. check_val_every_n_epoch=2 > max_epochs: no validation inside fit, because
        # the model only exists once the epoch has ended; the run validates after fit.
        return {"max_epochs": 1, "num_sanity_val_steps": 0, "check_val_every_n_epoch": 2}

    def configure_optimizers(self) -> None:
        return None

    def on_train_epoch_start(self) -> None:
        self._train_embeddings, self._train_index = [], []

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        self._train_embeddings.append(self.model.embed(batch.image))
        self._train_index.append(batch.index.to(self.device))

    def on_train_epoch_end(self) -> None:
        rows, index = self._train_embeddings, torch.cat(self._train_index)
        self._train_embeddings, self._train_index = [], []
        self.fit_model(gather_rows(self, rows, index))

    def fit_model(self, embeddings: Embeddings) -> None:
        """Fit the torch model on every training image's embedding (every rank holds all of them)."""
        self.model.fit(embeddings)


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
        backbone: Mapping[str, Any] | None = None,
        **model_args: Any,
    ) -> None:
        # Settings first: a mistake is reported before the backbone is loaded.
        if epochs < 1:
            raise UserInputError(f"method.epochs must be at least 1, got {epochs}")
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
        monitor, mode = self.best_epoch_monitor or (None, "min")
        datamodule = getattr(self.trainer, "datamodule", None)
        if monitor is not None and monitor.startswith("val_synthetic_") and getattr(datamodule, "val_synthesis", True) is None:
            log.info("dataset.val_synthesis is null: the best epoch is chosen by val_loss instead of %s", monitor)
            monitor, mode = "val_loss", "min"
        return [
            ModelCheckpoint(
                dirpath=Path(self.trainer.default_root_dir) / "checkpoints", filename="best_epoch", monitor=monitor,
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
        These passes sit outside Lightning's loops: the run's progress callback (if it has `track`)
        shows them on rank 0 under the name `what`.
        """
        was_training = self.model.training
        self.model.eval()
        rows, indices = [], []
        progress = getattr(self._trainer, "progress_bar_callback", None) if self.global_rank == 0 else None
        for batch in progress.track(loader, what) if hasattr(progress, "track") else loader:
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
