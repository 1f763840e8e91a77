"""The public benchmarks' own folder layouts: BTAD, VisA and DAGM 2007.

Each is read where it lies, as published (no copy, no conversion into MVTec's layout); a layout
that does not match is refused with one line that names what was expected.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from anomalib_lite.data.datamodule import CategoryDataModule
from anomalib_lite.data.samples import Sample, list_images
from anomalib_lite.errors import UserInputError

log = logging.getLogger(__name__)


def _category_dir(root: Path, category: str, expected: str, marker: str) -> Path:
    """`root/category`, or one line naming the layout expected and the categories found."""
    if not root.is_dir():
        raise UserInputError(f"dataset root not found: {root} (set dataset.root=...; expected {expected})")
    folder = root / category
    if not (folder / marker).is_dir():
        available = sorted(p.name for p in root.iterdir() if (p / marker).is_dir())
        raise UserInputError(
            f"category '{category}' not found in {root}: expected {expected} "
            f"(categories with that layout there: {', '.join(available) or 'none'})"
        )
    return folder


class BTADDataModule(CategoryDataModule):
    """BTAD (beanTech, 2021): `<root>/<category>/{train/ok, test/ok, test/ko, ground_truth/ko}`.

    Categories `01`, `02`, `03`; images are `.bmp` or `.png` depending on the category, and so are
    the masks: a defect image's mask is `ground_truth/ko/<stem>.png` or `<stem>.bmp`.
    """

    dataset_name = "btad"
    LAYOUT = "<root>/<category>/train/ok, test/{ok,ko}, ground_truth/ko/<stem>.png|.bmp (BTAD)"

    def scan(self) -> tuple[list[Sample], list[Sample]]:
        folder = _category_dir(self.root, self.category, self.LAYOUT, "train/ok")
        train = [Sample(p, 0, "good") for p in list_images(folder / "train" / "ok")]
        if not train:
            raise UserInputError(f"no training images in {folder / 'train' / 'ok'} (expected {self.LAYOUT})")
        if not (folder / "test").is_dir():
            raise UserInputError(f"no test folder in {folder} (expected {self.LAYOUT})")
        test = [Sample(p, 0, "good") for p in list_images(folder / "test" / "ok")] if (folder / "test" / "ok").is_dir() else []
        masks = folder / "ground_truth" / "ko"
        for image in list_images(folder / "test" / "ko") if (folder / "test" / "ko").is_dir() else []:
            candidates = [masks / f"{image.stem}{suffix}" for suffix in (".png", ".bmp", ".PNG", ".BMP")]
            mask = next((c for c in candidates if c.is_file()), candidates[0])
            test.append(Sample(image, 1, "ko", mask))
        return train, test


class VisADataModule(CategoryDataModule):
    """VisA (Zou et al., 2022) as published: `<root>/split_csv/1cls.csv` (columns object, split,
    label, image, mask; paths relative to the root) over `<root>/<category>/Data/{Images,Masks}`.

    Training: the category's `train` / `normal` rows; test: its `test` rows (`anomaly` with their
    mask). VisA's masks hold 0 and small class values rather than 0/255: a pixel is defect where
    its value is above `dataset.mask_threshold` (0), as for every dataset.
    """

    dataset_name = "visa"
    SPLIT_FILE = "split_csv/1cls.csv"

    def __init__(self, root: str | Path, category: str, split_file: str = SPLIT_FILE, **kwargs) -> None:
        super().__init__(root, category, **kwargs)
        self.split_file = split_file

    def scan(self) -> tuple[list[Sample], list[Sample]]:
        expected = f"<root>/{self.split_file} with columns object,split,label,image,mask (VisA)"
        split_path = self.root / self.split_file
        if not split_path.is_file():
            raise UserInputError(f"no VisA split file at {split_path} (expected {expected})")
        with split_path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"object", "split", "label", "image", "mask"} <= set(rows[0]):
            raise UserInputError(f"{split_path}: unexpected columns {list(rows[0]) if rows else []} (expected {expected})")
        categories = sorted({row["object"] for row in rows})
        rows = [row for row in rows if row["object"] == self.category]
        if not rows:
            raise UserInputError(f"category '{self.category}' is not in {split_path} (categories: {', '.join(categories)})")
        train, test, skipped = [], [], 0
        for row in rows:
            image = self.root / row["image"]
            split, label = row["split"].strip().lower(), row["label"].strip().lower()
            if split not in ("train", "test") or label not in ("normal", "anomaly"):
                raise UserInputError(f"{split_path}: unexpected split/label {row['split']}/{row['label']} for {row['image']}")
            if split == "train" and label == "normal":
                train.append(Sample(image, 0, "good"))
            elif split == "test" and label == "normal":
                test.append(Sample(image, 0, "good"))
            elif split == "test":
                if not row["mask"]:
                    raise UserInputError(f"{split_path}: the anomalous test image {row['image']} has no mask")
                test.append(Sample(image, 1, "anomaly", self.root / row["mask"]))
            else:
                skipped += 1
        if skipped:
            log.warning("%s: %d anomalous images listed for training are left out (training is on normal images)", self.name, skipped)
        missing = [s.image_path for s in train + test if not s.image_path.is_file()]
        if missing:
            raise UserInputError(f"{len(missing)} images listed in {split_path} are missing, e.g. {missing[0]}")
        return train, test


def read_dagm_labels(label_dir: Path) -> dict[str, str | None]:
    """DAGM's `Label/Labels.txt` -> {image file: its label file, or None for a normal image}.

    A first line holding one number, then one line per image:
    `<number> <defective 0|1> <image file> 0 <label file>`. Without Labels.txt an image is
    defective when `Label/<stem>_label.PNG` exists.
    """
    labels_file = label_dir / "Labels.txt"
    if not labels_file.is_file():
        return {}
    result: dict[str, str | None] = {}
    for line in labels_file.read_text().splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue  # the header line
        flag, image = fields[1], fields[2]
        if flag not in ("0", "1"):
            raise UserInputError(f"{labels_file}: unexpected line {line!r} (expected <number> <0|1> <image> 0 <label file>)")
        result[image] = fields[4] if flag == "1" and len(fields) > 4 else None
        if flag == "1" and len(fields) <= 4:
            raise UserInputError(f"{labels_file}: defective image {image} has no label file")
    return result


class DAGMDataModule(CategoryDataModule):
    """DAGM 2007: `<root>/<category>/{Train,Test}/*.PNG` with `Label/Labels.txt` and the defects'
    weak labels `Label/<stem>_label.PNG` (an ellipse around each defect, not its outline).

    Training: the Train images labelled defect-free (the defective ones are left out, and said so);
    test: every Test image. The masks being ellipses, pixel metrics measure how well a map covers
    the ellipse: comparable between methods, not with MVTec's outlines.
    """

    dataset_name = "dagm"
    LAYOUT = "<root>/<category>/{Train,Test}/*.PNG with Label/Labels.txt and Label/<stem>_label.PNG (DAGM 2007)"

    def _split(self, folder: Path) -> list[Sample]:
        label_dir = folder / "Label"
        labels = read_dagm_labels(label_dir)
        samples = []
        for image in list_images(folder):
            if image.name in labels:
                label_file = labels[image.name]
            else:
                fallback = label_dir / f"{image.stem}_label.PNG"
                label_file = fallback.name if fallback.is_file() else None
            if label_file is None:
                samples.append(Sample(image, 0, "good"))
            else:
                samples.append(Sample(image, 1, "defect", label_dir / label_file))
        return samples

    def scan(self) -> tuple[list[Sample], list[Sample]]:
        folder = _category_dir(self.root, self.category, self.LAYOUT, "Train")
        if not (folder / "Test").is_dir():
            raise UserInputError(f"no Test folder in {folder} (expected {self.LAYOUT})")
        train_all = self._split(folder / "Train")
        train = [s for s in train_all if s.label == 0]
        if not train:
            raise UserInputError(f"no defect-free training images in {folder / 'Train'} (expected {self.LAYOUT})")
        if len(train) < len(train_all):
            log.info("%s: %d defective training images left out (training is on defect-free images)",
                     self.name, len(train_all) - len(train))
        log.info("%s: DAGM's labels are ellipses around the defects: pixel metrics measure coverage of the ellipse", self.name)
        return train, self._split(folder / "Test")
