"""Datasets: synthetic generation, MVTec/folder reading, resizing, the validation split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_lite.data import DEFECT_TYPES, FolderDataModule, MVTecDataModule, generate_category
from anomalib_lite.errors import UserInputError


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("synthetic")
    for category in ("stripes", "disc"):
        generate_category(root, category, image_size=64, num_train=10, num_test_good=3, num_test_per_defect=2)
    return root


def test_synthetic_layout_and_exact_masks(synthetic_root) -> None:
    category = synthetic_root / "disc"
    assert len(list((category / "train" / "good").glob("*.png"))) == 10
    for defect in DEFECT_TYPES:
        for image_path in (category / "test" / defect).glob("*.png"):
            mask = np.asarray(Image.open(category / "ground_truth" / defect / f"{image_path.stem}_mask.png"))
            assert set(np.unique(mask)) <= {0, 255} and mask.any(), f"{defect} mask is empty"
            assert mask.shape == np.asarray(Image.open(image_path)).shape[:2]


def test_synthetic_generation_is_seeded_and_cached(tmp_path, synthetic_root) -> None:
    again = generate_category(tmp_path, "disc", image_size=64, num_train=10, num_test_good=3, num_test_per_defect=2)
    for path in (synthetic_root / "disc").rglob("*.png"):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(again / path.relative_to(synthetic_root / "disc"))))
    stamp = (again / "train" / "good" / "000.png").stat().st_mtime_ns
    generate_category(tmp_path, "disc", image_size=64, num_train=10, num_test_good=3, num_test_per_defect=2)
    assert (again / "train" / "good" / "000.png").stat().st_mtime_ns == stamp  # cached, not rewritten
    with pytest.raises(UserInputError, match="unknown synthetic category"):
        generate_category(tmp_path, "nosuch")


def test_foreign_folder_is_never_overwritten(tmp_path) -> None:
    (tmp_path / "stripes").mkdir()
    (tmp_path / "stripes" / "mine.txt").write_text("user data")
    with pytest.raises(UserInputError, match="not a synthetic dataset"):
        generate_category(tmp_path, "stripes")
    assert (tmp_path / "stripes" / "mine.txt").read_text() == "user data"


def test_mvtec_split_resize_crop_and_batches(synthetic_root) -> None:
    datamodule = MVTecDataModule(synthetic_root, "disc", image_size=48, crop_size=40, batch_size=4, num_workers=0, val_ratio=0.2)
    datamodule.setup()
    assert len(datamodule.train_samples) == 8 and len(datamodule.val_samples) == 2
    assert all(s.label == 0 for s in datamodule.val_samples)
    assert not {s.image_path for s in datamodule.val_samples} & {s.image_path for s in datamodule.train_samples}
    assert len(datamodule.test_samples) == 3 + 2 * len(DEFECT_TYPES)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["image"].shape == (4, 3, 40, 40) and batch["mask"].shape == (4, 40, 40)
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}  # nearest-neighbour masks stay binary
    other_seed = MVTecDataModule(synthetic_root, "disc", num_workers=0, val_ratio=0.2, seed=1)
    other_seed.setup()
    assert {s.image_path for s in other_seed.val_samples} != {s.image_path for s in datamodule.val_samples}


def test_grayscale_rgba_and_jpeg_become_rgb(tmp_path, synthetic_root) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "stripes", root / "part")
    train = root / "part" / "train" / "good"
    Image.open(train / "000.png").convert("L").save(train / "000.png")
    Image.open(train / "001.png").convert("RGBA").save(train / "001.png")
    Image.open(train / "002.png").convert("L").save(train / "002.jpg", quality=90)
    (train / "002.png").unlink()
    datamodule = MVTecDataModule(root, "part", image_size=32, num_workers=0, val_ratio=0.1)
    datamodule.setup()
    names = {s.image_path.name for s in datamodule.train_samples + datamodule.val_samples}
    assert "002.jpg" in names
    dataset = datamodule.train_dataloader().dataset
    for i in range(len(dataset)):
        assert dataset[i]["image"].shape == (3, 32, 32)


def test_folder_datamodule(tmp_path, synthetic_root) -> None:
    category = synthetic_root / "disc"
    datamodule = FolderDataModule(
        normal_dir=category / "train" / "good", abnormal_dir=category / "test" / "hole",
        mask_dir=category / "ground_truth" / "hole", image_size=32, num_workers=0, val_ratio=0.2, test_ratio=0.2,
    )
    datamodule.setup()
    assert len(datamodule.test_samples) == 2 + 2 and datamodule.has_masks
    assert len(datamodule.train_samples) + len(datamodule.val_samples) == 8
    no_masks = FolderDataModule(normal_dir=category / "train" / "good", abnormal_dir=category / "test" / "hole", num_workers=0)
    no_masks.setup()
    assert not no_masks.has_masks
    with pytest.raises(UserInputError, match="dataset folder not found"):
        FolderDataModule(normal_dir=tmp_path / "nope", abnormal_dir=category / "test" / "hole").setup()
