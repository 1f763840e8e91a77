"""Datasets: synthetic generation, MVTec/folder reading, resizing, the validation split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_lite.data import (
    DEFECT_TYPES,
    Batch,
    CutBlendSynthesizer,
    FolderDataModule,
    MVTecDataModule,
    ValidationSet,
    generate_category,
)
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
    assert isinstance(batch, Batch) and len(batch) == 4
    assert batch.image.shape == (4, 3, 40, 40) and batch.mask.shape == (4, 40, 40)
    assert 0 <= batch.image.min() and batch.image.max() <= 1
    assert set(torch.unique(batch.mask).tolist()) <= {0.0, 1.0}  # nearest-neighbour masks stay binary
    assert batch.index.tolist() == [0, 1, 2, 3] and batch.label.dtype == torch.long and len(batch.image_path) == 4
    other_seed = MVTecDataModule(synthetic_root, "disc", num_workers=0, val_ratio=0.2, seed=1)
    other_seed.setup()
    assert {s.image_path for s in other_seed.val_samples} != {s.image_path for s in datamodule.val_samples}


def test_rd_protocol_transforms_every_split_and_keeps_the_model_resize(synthetic_root) -> None:
    settings = {"image_size": 48, "crop_size": 40, "batch_size": 4, "num_workers": 0, "val_ratio": 0.2}
    aligned = MVTecDataModule(synthetic_root, "disc", **settings)
    rd = MVTecDataModule(synthetic_root, "disc", protocol="rd", **settings)
    for datamodule in (aligned, rd):
        datamodule.setup()
    assert rd.resize.settings() == aligned.resize.settings()  # a checkpoint scores new images with the centre crop
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        batch_aligned, batch_rd = next(iter(getattr(aligned, loader)())), next(iter(getattr(rd, loader)()))
        assert batch_rd.image.shape == batch_aligned.image.shape and not torch.equal(batch_rd.image, batch_aligned.image)
    # The same draw in another run; masks stay 0/1 (their alignment with the image: test_retrieval.py).
    again = MVTecDataModule(synthetic_root, "disc", protocol="rd", **settings)
    again.setup()
    first, second = next(iter(rd.test_dataloader())), next(iter(again.test_dataloader()))
    assert torch.equal(first.image, second.image) and torch.equal(first.mask, second.mask)
    assert set(torch.unique(first.mask).tolist()) <= {0.0, 1.0}
    with pytest.raises(UserInputError, match="crop_size"):
        MVTecDataModule(synthetic_root, "disc", image_size=48, protocol="rd")
    with pytest.raises(UserInputError, match="dataset.protocol='rotated': must be one of aligned, rd"):
        MVTecDataModule(synthetic_root, "disc", image_size=48, crop_size=40, protocol="rotated")


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
        assert dataset[i].image.shape == (3, 32, 32)


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


def test_few_shot_keeps_k_seeded_training_images(synthetic_root) -> None:
    full = MVTecDataModule(synthetic_root, "disc", num_workers=0, val_ratio=0.2)
    full.setup()
    shots = {}
    for k in (1, 2, 4, 8):
        few = MVTecDataModule(synthetic_root, "disc", num_workers=0, val_ratio=0.2, num_shots=k)
        few.setup()
        assert len(few.train_samples) == k
        assert {s.image_path for s in few.train_samples} <= {s.image_path for s in full.train_samples}
        assert few.val_samples == full.val_samples and few.test_samples == full.test_samples
        shots[k] = {s.image_path for s in few.train_samples}
    again = MVTecDataModule(synthetic_root, "disc", num_workers=0, val_ratio=0.2, num_shots=4)
    again.setup()
    assert {s.image_path for s in again.train_samples} == shots[4]  # seeded
    assert shots[1] <= shots[2] <= shots[4] <= shots[8]  # nested: k images are the first k of the draw
    too_many = MVTecDataModule(synthetic_root, "disc", num_workers=0, val_ratio=0.2, num_shots=9)
    with pytest.raises(UserInputError, match="num_shots=9 but only 8"):
        too_many.setup()
    with pytest.raises(UserInputError, match="num_shots"):
        MVTecDataModule(synthetic_root, "disc", num_shots=0)


def test_labelled_anomalies_leave_the_test_split_seeded(synthetic_root) -> None:
    full = MVTecDataModule(synthetic_root, "disc", num_workers=0, val_ratio=0.2)
    full.setup()
    semi = MVTecDataModule(synthetic_root, "disc", num_workers=0, val_ratio=0.2, num_labelled_anomalies=2)
    semi.setup()
    labelled = {s.image_path for s in semi.labelled_samples}
    assert len(labelled) == 2 and all(s.label == 1 and s.mask_path is not None for s in semi.labelled_samples)
    assert labelled.isdisjoint(s.image_path for s in semi.test_samples)
    assert {s.image_path for s in semi.test_samples} | labelled == {s.image_path for s in full.test_samples}
    assert semi.train_samples == full.train_samples and semi.val_samples == full.val_samples
    batch = next(iter(semi.labelled_dataloader()))
    assert batch.mask.shape[0] == 2 and bool((batch.mask.flatten(1).amax(1) > 0).all())
    again = MVTecDataModule(synthetic_root, "disc", num_workers=0, val_ratio=0.2, num_labelled_anomalies=2)
    again.setup()
    assert {s.image_path for s in again.labelled_samples} == labelled
    draws = set()
    for seed in range(6):
        other = MVTecDataModule(synthetic_root, "disc", num_workers=0, val_ratio=0.2, seed=seed, num_labelled_anomalies=2)
        other.setup()
        draws.add(frozenset(s.image_path for s in other.labelled_samples))
    assert len(draws) > 1
    anomalous = sum(s.label == 1 for s in full.test_samples)
    too_many = MVTecDataModule(synthetic_root, "disc", num_workers=0, val_ratio=0.2, num_labelled_anomalies=anomalous)
    with pytest.raises(UserInputError, match="at least one must stay"):
        too_many.setup()


def test_cut_blend_synthesis_is_seeded_and_its_masks_are_exact() -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sources = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out_a, masks_a, has_a = CutBlendSynthesizer(seed=3)(images, sources)
    out_b, masks_b, _ = CutBlendSynthesizer(seed=3)(images, sources)
    out_c, _, _ = CutBlendSynthesizer(seed=4)(images, sources)
    assert has_a.tolist() == [True] * 4
    assert torch.equal(out_a, out_b) and torch.equal(masks_a, masks_b) and not torch.equal(out_a, out_c)
    assert masks_a.shape == (4, 32, 32) and set(masks_a.unique().tolist()) == {0.0, 1.0}
    outside = (masks_a == 0).unsqueeze(1).expand_as(images)
    assert torch.equal(out_a[outside], images[outside])  # nothing changes outside the mask
    inside = (masks_a == 1).unsqueeze(1).expand_as(images)
    assert (out_a[inside] - images[inside]).abs().min() > 0  # every masked pixel was blended (random data)
    assert torch.equal(images, torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))  # input kept


def test_cut_blend_pastes_a_crop_of_the_source_with_its_size_and_opacity() -> None:
    images = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    sources = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    synthesizer = CutBlendSynthesizer(num_patches=(1, 1), patch_fraction=(0.2, 0.4), opacity=(1.0, 1.0), seed=0)
    out, masks, _ = synthesizer(images, sources)
    for index in range(2):
        rows, cols = torch.nonzero(masks[index], as_tuple=True)
        top, left = int(rows.min()), int(cols.min())
        height, width = int(rows.max()) - top + 1, int(cols.max()) - left + 1
        assert masks[index].sum() == height * width  # one rectangle
        assert 4 <= height <= 8 and 4 <= width <= 8  # 0.2..0.4 of 20 px
        patch = out[index, :, top : top + height, left : left + width]
        # Opacity 1: the patch is an exact crop of the source image somewhere.
        found = any(
            torch.equal(patch, sources[index, :, y : y + height, x : x + width])
            for y in range(21 - height) for x in range(21 - width)
        )
        assert found
    # Opacity 0.5: 2 * out - image is the source crop (a blend, not a paste).
    half = CutBlendSynthesizer(num_patches=(1, 1), patch_fraction=(0.2, 0.4), opacity=(0.5, 0.5), seed=0)
    out, masks, _ = half(images, sources)
    rows, cols = torch.nonzero(masks[0], as_tuple=True)
    top, left, height, width = int(rows.min()), int(cols.min()), int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
    recovered = 2 * out[0, :, top : top + height, left : left + width] - images[0, :, top : top + height, left : left + width]
    assert any(
        torch.allclose(recovered, sources[0, :, y : y + height, x : x + width], atol=1e-5)
        for y in range(21 - height) for x in range(21 - width)
    )
    with pytest.raises(ValueError, match="opacity"):
        CutBlendSynthesizer(opacity=(0.0, 1.0))
    with pytest.raises(ValueError, match="num_patches"):
        CutBlendSynthesizer(num_patches=(0, 2))


def test_validation_set_pairs_each_normal_image_with_a_seeded_synthetic_anomaly(synthetic_root) -> None:
    datamodule = MVTecDataModule(synthetic_root, "stripes", image_size=32, num_workers=0, val_ratio=0.3, batch_size=4)
    datamodule.setup()
    assert len(datamodule.val_samples) == 3
    loader = datamodule.val_dataloader()
    assert isinstance(loader.dataset, ValidationSet) and len(loader.dataset) == 6
    batches = list(loader)
    labels = torch.cat([b.label for b in batches])
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]  # interleaved: every batch holds both kinds
    assert torch.cat([b.index for b in batches]).tolist() == list(range(6))
    images = torch.cat([b.image for b in batches])
    masks = torch.cat([b.mask for b in batches])
    for normal, anomalous, mask in zip(images[0::2], images[1::2], masks[1::2]):
        changed = (anomalous != normal).any(dim=0)
        assert mask.any() and torch.equal(changed, mask.bool())  # the mask is exactly the blended pixels
    assert not masks[0::2].any()
    # Seeded per image: the same synthetic set in every epoch and run, another one with another seed.
    again = torch.cat([b.image for b in datamodule.val_dataloader()])
    assert torch.equal(images, again)
    other = MVTecDataModule(synthetic_root, "stripes", image_size=32, num_workers=0, val_ratio=0.3, batch_size=4, seed=0)
    other.setup()
    other.seed = 5  # same split, other synthesis seed
    assert not torch.equal(torch.cat([b.image for b in other.val_dataloader()])[1::2], images[1::2])
    plain = MVTecDataModule(synthetic_root, "stripes", image_size=32, num_workers=0, val_ratio=0.3, val_synthesis=None)
    plain.setup()
    assert [item.label for item in plain.val_dataloader().dataset] == [0, 0, 0]


def test_validation_needs_a_held_out_image(synthetic_root) -> None:
    with pytest.raises(UserInputError, match=r"dataset.val_ratio=0: must be a number in \(0, 1\)"):
        MVTecDataModule(synthetic_root, "disc", val_ratio=0)
    tiny = MVTecDataModule(synthetic_root, "disc", num_workers=0, val_ratio=0.01)
    tiny.setup()
    assert len(tiny.val_samples) == 1  # at least one, however small the ratio
