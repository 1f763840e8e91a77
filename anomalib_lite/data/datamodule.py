"""LightningDataModules: MVTec AD layout, a custom folder layout, and the shared base."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from anomalib_lite.data.batch import collate_items
from anomalib_lite.data.image_io import DataReport, check_files
from anomalib_lite.data.protocols import Protocol, RandomRotationCrop
from anomalib_lite.data.samples import AnomalyDataset, ImageResize, Sample, list_images
from anomalib_lite.data.validation import ValidationSet
from anomalib_lite.errors import UserInputError
from anomalib_lite.schema import Fraction, NonNegative, NonNegativeInt, PositiveInt, Size, check_arguments

log = logging.getLogger(__name__)

# Synthetic anomalies of the validation view (CutBlendSynthesizer's arguments).
DEFAULT_VAL_SYNTHESIS = {"num_patches": (1, 4), "patch_fraction": (0.05, 0.3), "opacity": (0.3, 1.0)}


class AnomalyDataModule(L.LightningDataModule):
    """Train on normal images, validate on a held-out normal slice, test on labelled images.

    The validation split is `val_ratio` of the normal training images, drawn with `seed`:
    it holds only normal images, so nothing fitted on it ever sees a test label. Its loader also
    yields each of them with a synthetic anomaly pasted in (`ValidationSet`; `val_synthesis=None`
    turns that off), for label-free model selection.
    `num_shots=k` (few-shot) then keeps k of the remaining normal images for fitting, drawn with
    the same seed; validation still uses the held-out slice, never the test set.
    `protocol="rd"`: the PaDiM paper's RdMVTec, every image (training, validation, test) rotated by
    U(-`rd_max_angle`, `rd_max_angle`) degrees and cropped at random to `crop_size`, fixed per image
    (`protocols.RandomRotationCrop`); "aligned" (default): the centre crop.
    `num_labelled_anomalies=n` (semi-supervised methods, e.g. NBS): n anomalous test images with
    their masks, drawn with `seed`, are moved from the test split to `labelled_samples`
    (`labelled_dataloader()`); they are never tested on. A method that does not learn from them
    (`AnomalyModule.uses_labelled_anomalies`) still loses them from its test set, so its numbers
    compare with the semi-supervised ones.
    Whether the training images are shuffled is the method's call: the run sets `train_shuffle`
    from `AnomalyModule.train_shuffle` (the data layer knows no model).
    Subclasses implement `scan()` returning (normal training samples, test samples).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> AnomalyDataModule:
        # The settings against the signatures' declared types and bounds (the config's check, for
        # Python too), before any constructor runs.
        check_arguments(cls, kwargs, "dataset")
        return super().__new__(cls)

    def __init__(
        self,
        image_size: Size = 256,
        crop_size: Size | None = None,
        batch_size: PositiveInt = 32,
        eval_batch_size: PositiveInt | None = None,
        num_workers: NonNegativeInt = 2,
        val_ratio: Annotated[float, Fraction] = 0.1,
        seed: int = 0,
        num_shots: PositiveInt | None = None,
        val_synthesis: dict | None = DEFAULT_VAL_SYNTHESIS,
        mask_threshold: Annotated[float, NonNegative] = 0,
        protocol: Protocol = "aligned",
        rd_max_angle: Annotated[float, NonNegative] = 10.0,
        num_labelled_anomalies: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        self.resize = ImageResize(image_size, crop_size)
        self.protocol = protocol
        # The data sets' resize and per-image geometry. RdMVTec ("rd") replaces the centre crop by a
        # rotation and a random crop per image; the model's own resize (`self.resize`, what a
        # checkpoint scores new images with) keeps the centre crop.
        self.dataset_resize, self.geometry = self.resize, None
        if protocol == "rd":
            if crop_size is None:
                raise UserInputError("dataset.protocol=rd crops at random: set dataset.crop_size (the paper: 256 -> 224)")
            self.dataset_resize = ImageResize(image_size)
            self.geometry = RandomRotationCrop(self.resize.size, self.resize.output_size, rd_max_angle, seed)
        self.mask_threshold = mask_threshold
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_ratio = val_ratio
        self.num_shots = num_shots
        self.num_labelled_anomalies = num_labelled_anomalies
        self.train_shuffle = True
        self.labelled_samples: list[Sample] = []
        self.seed = seed
        self.val_synthesis = dict(val_synthesis) if val_synthesis is not None else None
        self.train_samples: list[Sample] | None = None
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []
        self.report = DataReport()

    # -- to implement -------------------------------------------------------------------------
    def scan(self) -> tuple[list[Sample], list[Sample]]:
        raise NotImplementedError

    # For metrics.json, collect.py and run names: the layout and the category (or folder) fitted.
    dataset_name: str = "custom"
    category: str = ""

    @property
    def name(self) -> str:
        """How messages refer to the data (a path)."""
        return type(self).__name__

    # -- lightning hooks ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_samples is not None:
            return
        train, test = self.scan()
        if not any(s.label == 1 for s in test):
            raise UserInputError(
                f"the test set of {self.name} has no anomalous images: image and pixel metrics "
                "need defective test images (with masks)"
            )
        if not any(s.label == 0 for s in test):
            raise UserInputError(f"the test set of {self.name} has no normal images: AUROC needs both kinds")
        self.report = check_files(train + test, self.mask_threshold)
        report = self.report
        if report.num_masks and len(report.empty_masks) == report.num_masks and max(report.mask_values, default=0) > 0:
            raise UserInputError(
                f"dataset.mask_threshold={self.mask_threshold:g}: no pixel of the {report.num_masks} defect masks is above "
                "it, so there would be no defect pixel to score; lower it (0: every non-zero mask pixel is defect)"
            )
        self._log_report()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        num_val = max(1, round(len(train) * self.val_ratio))
        if num_val >= len(train):
            raise UserInputError(
                f"{self.name} has {len(train)} normal training image{'s' if len(train) != 1 else ''}: at least 2 are "
                f"needed, one held out for validation (thresholds) and one to fit on (dataset.val_ratio={self.val_ratio})"
            )
        fit_order = order[num_val:]
        if self.num_shots is not None:
            if self.num_shots > len(fit_order):
                raise UserInputError(
                    f"{self.name}: dataset.num_shots={self.num_shots} but only {len(fit_order)} normal images "
                    f"are left for fitting after the validation split (val_ratio={self.val_ratio})"
                )
            fit_order = fit_order[: self.num_shots]
        self.val_samples = [train[i] for i in sorted(order[:num_val])]
        self.train_samples = [train[i] for i in sorted(fit_order)]
        self.test_samples = test
        if self.num_labelled_anomalies:
            self._take_labelled_anomalies()
        log.info(
            "%s: fitting on %d of %d normal training images, %d held out for thresholds and model selection; "
            "%d test images",
            self.name, len(self.train_samples), len(train), len(self.val_samples), len(self.test_samples),
        )

    def _take_labelled_anomalies(self) -> None:
        """Move `num_labelled_anomalies` seeded anomalous test images (with masks) to `labelled_samples`."""
        anomalous = [i for i, sample in enumerate(self.test_samples) if sample.label == 1]
        count = self.num_labelled_anomalies
        if count >= len(anomalous):
            raise UserInputError(
                f"{self.name}: dataset.num_labelled_anomalies={count}, but the test split has {len(anomalous)} anomalous "
                "images: at least one must stay to test on"
            )
        without_mask = [self.test_samples[i].image_path for i in anomalous if self.test_samples[i].mask_path is None]
        if without_mask:
            raise UserInputError(
                f"{self.name}: dataset.num_labelled_anomalies needs a mask for every anomalous test image; "
                f"{len(without_mask)} have none (e.g. {without_mask[0]})"
            )
        # Its own stream of the seed: the validation split's draw is unchanged by this option.
        generator = torch.Generator().manual_seed(self.seed + 1_000_003)
        chosen = {anomalous[i] for i in torch.randperm(len(anomalous), generator=generator)[:count].tolist()}
        self.labelled_samples = [self.test_samples[i] for i in sorted(chosen)]
        self.test_samples = [sample for i, sample in enumerate(self.test_samples) if i not in chosen]
        log.info(
            "%s: %d labelled anomalous images taken from the test split (seed %d; e.g. %s); %d test images remain, "
            "%d of them anomalous", self.name, count, self.seed, self.labelled_samples[0].image_path,
            len(self.test_samples), len(anomalous) - count,
        )

    def _log_report(self) -> None:
        report = self.report
        height, width = self.resize.size
        if report.smallest and (report.smallest[0] < width or report.smallest[1] < height):
            log.warning(
                "%s: images as small as %dx%d are upscaled to the image size %dx%d (dataset.image_size)",
                self.name, *report.smallest, width, height,
            )
        if report.rescaled:
            log.warning(
                "%s: %d float images lie outside [0, 1] and were scaled by their own min and max (e.g. %s)",
                self.name, len(report.rescaled), report.rescaled[0],
            )
        if report.num_masks and not report.mask_values <= {0.0, 255.0}:
            shown = ", ".join(f"{v:g}" for v in sorted(report.mask_values)[:6])
            log.info(
                "%s: masks hold the values %s%s, not 0/255: a pixel is defect where its mask value is above "
                "dataset.mask_threshold=%g", self.name, shown, ", ..." if len(report.mask_values) > 6 else "",
                self.mask_threshold,
            )
        if report.empty_masks:
            log.warning(
                "%s: %d of %d defect masks have no pixel above dataset.mask_threshold=%g (e.g. %s): those images "
                "count for image metrics only", self.name, len(report.empty_masks), report.num_masks,
                self.mask_threshold, report.empty_masks[0],
            )

    def pixel_metrics_note(self) -> str | None:
        """Why pixel metrics cannot be computed on this test set, or None when they can."""
        anomalous = [s for s in self.test_samples if s.label == 1]
        if not anomalous:
            return None
        if any(s.mask_path is None for s in anomalous):
            return f"no pixel metrics: {sum(s.mask_path is None for s in anomalous)} anomalous test images have no mask"
        if len(self.report.empty_masks) == len(anomalous):
            return (
                f"no pixel metrics: none of the {len(anomalous)} defect masks has a pixel above "
                f"dataset.mask_threshold={self.mask_threshold:g}"
            )
        return None

    @property
    def has_masks(self) -> bool:
        """Every anomalous test image has a pixel ground truth."""
        return all(s.mask_path is not None for s in self.test_samples if s.label == 1)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False, num_workers: int | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers if num_workers is None else num_workers,
            collate_fn=collate_items,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = AnomalyDataset(self.train_samples, self.dataset_resize, geometry=self.geometry)
        return self._loader(dataset, self.batch_size, self.train_shuffle)

    def val_dataloader(self) -> DataLoader:
        # In-process: the set is small and its decoded images are cached across epochs.
        dataset = ValidationSet(self.val_samples, self.dataset_resize, self.val_synthesis, self.seed, geometry=self.geometry)
        return self._loader(dataset, self.eval_batch_size, num_workers=0)

    def labelled_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """The labelled anomalous images (`num_labelled_anomalies`), with their masks, in order."""
        dataset = AnomalyDataset(self.labelled_samples, self.dataset_resize, self.mask_threshold, geometry=self.geometry)
        return self._loader(dataset, batch_size or self.eval_batch_size, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        dataset = AnomalyDataset(self.test_samples, self.dataset_resize, self.mask_threshold, geometry=self.geometry)
        return self._loader(dataset, self.eval_batch_size)


def _find_mask(mask_dir: Path, image: Path) -> Path:
    """`<stem>_mask.png` (MVTec naming), else `<stem>.png`; the expected path if neither exists."""
    for candidate in (mask_dir / f"{image.stem}_mask.png", mask_dir / f"{image.stem}.png"):
        if candidate.is_file():
            return candidate
    return mask_dir / f"{image.stem}_mask.png"


class CategoryDataModule(AnomalyDataModule):
    """A benchmark's layout: a `root` folder holding one folder (or split entry) per `category`."""

    def __init__(self, root: str | Path, category: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.category = category

    @property
    def name(self) -> str:
        return f"{self.root}/{self.category}"


class MVTecDataModule(CategoryDataModule):
    """`<root>/<category>/{train/good, test/<type>, ground_truth/<type>/<stem>_mask.png}`."""

    dataset_name = "mvtec"

    def scan(self) -> tuple[list[Sample], list[Sample]]:
        if not self.root.is_dir():
            raise UserInputError(f"dataset root not found: {self.root} (set dataset.root=...)")
        category_dir = self.root / self.category
        if not category_dir.is_dir():
            available = sorted(p.name for p in self.root.iterdir() if (p / "train").is_dir())
            raise UserInputError(
                f"category '{self.category}' not found in {self.root} (available: {', '.join(available) or 'none'})"
            )
        train_dir = category_dir / "train" / "good"
        train = [Sample(p, 0, "good") for p in list_images(train_dir)]
        if not train:
            raise UserInputError(f"no training images in {train_dir}")
        test = []
        test_root = category_dir / "test"
        for type_dir in sorted(p for p in test_root.iterdir() if p.is_dir()) if test_root.is_dir() else []:
            for image in list_images(type_dir):
                if type_dir.name == "good":
                    test.append(Sample(image, 0, "good"))
                else:
                    mask = _find_mask(category_dir / "ground_truth" / type_dir.name, image)
                    test.append(Sample(image, 1, type_dir.name, mask))
        return train, test


class FolderDataModule(AnomalyDataModule):
    """A custom layout: a folder of normal images, a folder of anomalous ones, optional masks.

    Normal test images come from `normal_test_dir`, or else a seeded `test_ratio` slice of
    `normal_dir`. Without `mask_dir` only image-level metrics are computed.
    """

    dataset_name = "folder"

    def __init__(
        self,
        normal_dir: str | Path,
        abnormal_dir: str | Path,
        mask_dir: str | Path | None = None,
        normal_test_dir: str | Path | None = None,
        test_ratio: Annotated[float, Fraction] = 0.2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.normal_dir = Path(normal_dir).expanduser()
        self.abnormal_dir = Path(abnormal_dir).expanduser()
        self.mask_dir = Path(mask_dir).expanduser() if mask_dir else None
        self.normal_test_dir = Path(normal_test_dir).expanduser() if normal_test_dir else None
        self.test_ratio = test_ratio
        self.category = self.abnormal_dir.parent.name

    @property
    def name(self) -> str:
        return str(self.abnormal_dir.parent)

    def scan(self) -> tuple[list[Sample], list[Sample]]:
        folders = {
            "normal_dir": self.normal_dir, "abnormal_dir": self.abnormal_dir, "mask_dir": self.mask_dir,
            "normal_test_dir": self.normal_test_dir,
        }
        for setting, directory in folders.items():
            if directory is not None and not directory.is_dir():
                raise UserInputError(f"dataset folder not found: {directory} (dataset.{setting})")
        normal = [Sample(p, 0, "good") for p in list_images(self.normal_dir)]
        if not normal:
            raise UserInputError(f"no normal images in {self.normal_dir}")
        for setting, directory in (("abnormal_dir", self.abnormal_dir), ("normal_test_dir", self.normal_test_dir)):
            if directory is not None and directory.resolve() == self.normal_dir.resolve():
                raise UserInputError(
                    f"dataset.{setting} is dataset.normal_dir ({directory}): the training images would be tested as "
                    f"{'anomalies' if setting == 'abnormal_dir' else 'unseen normal images'}; give separate folders"
                )
        if self.normal_test_dir is not None:
            normal_test = [Sample(p, 0, "good") for p in list_images(self.normal_test_dir)]
        else:
            order = torch.randperm(len(normal), generator=torch.Generator().manual_seed(self.seed + 1)).tolist()
            num_test = max(1, round(len(normal) * self.test_ratio))
            normal_test = [normal[i] for i in sorted(order[:num_test])]
            normal = [normal[i] for i in sorted(order[num_test:])]
        defect_type = self.abnormal_dir.name
        abnormal = [
            Sample(p, 1, defect_type, _find_mask(self.mask_dir, p) if self.mask_dir else None)
            for p in list_images(self.abnormal_dir)
        ]
        return normal, normal_test + abnormal
