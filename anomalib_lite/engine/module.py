"""The base of every method's LightningModule.

`AnomalyModule` owns what is the same for all methods. Validation runs on held-out *normal*
images and on synthetic anomalies made from them (`data.ValidationSet`): the normal images fit
the post-processor (image/pixel thresholds and the heatmap colour scale, `PostProcessor`, whose
buffers travel in the checkpoint), the synthetic ones give label-free metrics for model selection
(`val_synthetic_*`). Test steps return one `AnomalyOutput` per batch to the callbacks.
The variants: `MemoryBankModule` (`memory_bank.py`) fits in one pass, `TrainedModule` and
`SynthesisTrainedModule` (`trained.py`) by gradient descent.

A method's LightningModule names its torch model (`model_class`; `build_model` when building it
takes more than passing the config through) and declares what it needs instead of being
inspected: `train_shuffle`, `ddp_find_unused_parameters`, `uses_labelled_anomalies`,
`trainer_settings()` (settings it must impose on the trainer) and its own callbacks
(`configure_callbacks()`, Lightning's hook). The constructor takes the method's config:
`backbone` (only methods built on a pretrained feature extractor have one) and the torch model's
arguments; trained methods also their training settings. They are checked against the declared
types and bounds of the signatures before anything is built (`schema.check_arguments`, the same
check the config gets), and saved as hyperparameters, so a checkpoint rebuilds the method.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch

from anomalib_lite import metrics
from anomalib_lite.data.batch import Batch
from anomalib_lite.data.datamodule import AnomalyDataModule
from anomalib_lite.data.samples import ImageResize
from anomalib_lite.engine.collector import PredictionCollector
from anomalib_lite.engine.post_processing import PostProcessor, migrate_state_dict
from anomalib_lite.engine.progress import PassTracker
from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.anomaly_map import AnomalyOutput
from anomalib_lite.models.components.interfaces import AnomalyModel, Embeddings
from anomalib_lite.schema import check_arguments
from anomalib_lite.utils.distributed import gather_samples

log = logging.getLogger(__name__)
T = TypeVar("T")

# The label-free selection metrics, computed on the synthetic validation view after each validation.
VALIDATION_METRICS = ("val_synthetic_image_auroc", "val_synthetic_pixel_auroc", "val_synthetic_aupro")


def gather_rows(module: L.LightningModule, rows: list[Embeddings], index: torch.Tensor) -> Embeddings:
    """Per-batch results (tensors, or dicts of named tensors) -> one result over all DDP ranks, in
    dataset order, of the same kind."""
    if isinstance(rows[0], dict):
        return gather_samples(module, {key: torch.cat([row[key] for row in rows]) for key in rows[0]}, index)
    return gather_samples(module, {"row": torch.cat(rows)}, index)["row"]


class AnomalyModule(L.LightningModule):
    model_class: type[AnomalyModel]
    model: AnomalyModel
    # Shuffle the training images (the run tells the data module; memory banks read them once, in order).
    train_shuffle: bool = True
    # DDP: some training steps leave parameters unused (e.g. one flow per step).
    ddp_find_unused_parameters: bool = False
    # Semi-supervised: learns from the data module's labelled anomalous images (`labelled_anomalies()`).
    uses_labelled_anomalies: bool = False

    def __new__(cls, *args: Any, **kwargs: Any) -> AnomalyModule:
        # The method's settings against its signatures' declared types and bounds, before any
        # constructor runs (and so before a backbone is loaded): the config's check, for Python too.
        check_arguments(cls, kwargs, "method")
        return super().__new__(cls)

    def __init__(self, backbone: Mapping[str, Any] | None = None, **model_args: Any) -> None:
        super().__init__()
        self.model = self.build_model(backbone, **model_args)
        self.post_processor = PostProcessor()
        self.validation_results: dict[str, float | None] = {}
        self._validation_predictions = PredictionCollector()
        # The run's resize and crop: set by the run, stored in the checkpoint, applied by forward().
        self.image_resize: ImageResize | None = None

    @property
    def image_threshold(self) -> torch.Tensor:
        """The post-processor's image threshold (where code written before it was one reads it)."""
        return self.post_processor.image_threshold

    @property
    def pixel_threshold(self) -> torch.Tensor:
        """The post-processor's pixel threshold (where code written before it was one reads it)."""
        return self.post_processor.pixel_threshold

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
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if not isinstance(datamodule, AnomalyDataModule) or not datamodule.labelled_samples:
            return None
        batches = list(datamodule.labelled_dataloader())
        images = torch.cat([batch.image for batch in batches]).to(self.device)
        return images, torch.cat([batch.mask for batch in batches]).to(self.device)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, map_location: str | torch.device | None = None, **overrides: Any
    ) -> AnomalyModule:
        """Lightning's loader, made safe: the file is read as data only and what it names is checked
        before anything is built (`anomalib_lite.engine.checkpoint.load_model`, which this calls); keyword
        arguments change the method's stored arguments. Returns the method in eval mode."""
        from anomalib_lite.engine.checkpoint import load_model  # it imports this module

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
        migrate_state_dict(checkpoint.setdefault("state_dict", {}))
        settings = checkpoint.get("anomalib_lite", {}).get("preprocessing")
        self.image_resize = ImageResize(**settings) if settings else None

    # -- validation: thresholds from normal images, selection metrics from synthetic anomalies ---
    def on_validation_epoch_start(self) -> None:
        self._validation_predictions.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._validation_predictions.add(self.model(batch.image), batch)

    def on_validation_epoch_end(self) -> None:
        if not len(self._validation_predictions):
            return
        gathered = self._validation_predictions.gather(self)
        self.post_processor.fit(gathered["score"], gathered["map"], gathered["label"])
        if bool((gathered["label"] != 0).any()):
            results = metrics.compute_metrics(
                gathered["score"], gathered["label"], gathered["map"], gathered["mask"], with_f1=False
            )
            values = (results["image_auroc"], results["pixel_auroc"], results["pixel_aupro"])
            self.validation_results = dict(zip(VALIDATION_METRICS, values))
            # Computed from the gathered set: every rank holds the same values.
            self.log_dict({k: float(v) for k, v in self.validation_results.items() if v is not None}, sync_dist=False)

    # -- passes over the data outside Lightning's loops --------------------------------------------
    def track(self, batches: Iterable[T], what: str) -> Iterable[T] | Iterator[T]:
        """`batches`, shown by the run's progress display under the name `what` (rank 0, and only
        where the display can show such a pass: `PassTracker`)."""
        progress = self._trainer.progress_bar_callback if self._trainer is not None and self.global_rank == 0 else None
        return progress.track(batches, what) if isinstance(progress, PassTracker) else batches

    # -- test and predict: one AnomalyOutput per batch, consumed by the callbacks ----------------
    def test_step(self, batch: Batch, batch_idx: int) -> AnomalyOutput:
        return self.model(batch.image)

    def predict_step(self, batch: Batch, batch_idx: int) -> AnomalyOutput:
        return self.model(batch.image)
