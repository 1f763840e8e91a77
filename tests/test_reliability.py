"""No silent wrong results, no lost runs, one clear line for every mistake.

The command runs in-process here (`conftest.run_main`: `anomalib_lite.cli.main`, as the console
script calls it), so each mistake costs no interpreter start-up; `test_bad_input.py` also runs the real subprocess.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import timm
import torch
from conftest import TINY_COMMON, TINY_SYNTHETIC, error_lines, run_main
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from anomalib_lite.cli import main
from anomalib_lite.data import generate_category
from anomalib_lite.data.datamodule import FolderDataModule, MVTecDataModule
from anomalib_lite.data.image_io import read_image, read_mask
from anomalib_lite.data.samples import ImageResize
from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.feature_extractor import create_backbone
from anomalib_lite.run_dir import STAGING


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (the staging folder aside) -> its sha256."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file() and STAGING not in p.relative_to(folder).parts
    }


def tiny(cache_dir: Path, *more: str) -> list[str]:
    return [*TINY_COMMON, *TINY_SYNTHETIC, f"paths.cache_dir={cache_dir}", "dataset.image_size=64",
            "dataset.generated_size=64", *more]


# -- config mistakes: one line naming the setting, exit 2, nothing created ------------------------------
CONFIG_MISTAKES = {
    "seed=abc": "seed='abc': must be an integer",
    "dataset.image_size=0": "dataset.image_size=0: must be an integer or a list of integers at least 1",
    "dataset.batch_size=0": "dataset.batch_size=0: must be an integer at least 1",
    "dataset.val_ratio=0": "dataset.val_ratio=0: must be a number in (0, 1)",
    "method.levels=[]": "method.levels=[]: must be a non-empty list",
    "method.coreset_sampler.ratio=abc": "method.coreset_sampler.ratio='abc': must be a number in (0, 1]",
    "+method.coreset_ratio=0.1": "method.coreset_ratio is not a setting of anomalib_lite.models.patchcore.Patchcore",
    "dataset=folder": "dataset.normal_dir is required",
    "trainer.max_epochs=abc": "trainer.max_epochs='abc': must be an integer or null",
    "overwrite=maybe": "overwrite='maybe': must be true or false",
    "seed=-1": "seed=-1: must be from 0 to 4294967295",
    "trainer=gpu": "trainer.accelerator=gpu: this machine has no CUDA GPU",
}


@pytest.mark.parametrize("mistake", list(CONFIG_MISTAKES))
def test_config_mistake_is_one_line_before_anything_is_written(mistake: str, tmp_path: Path, cache_dir: Path, capsys) -> None:
    if mistake == "trainer=gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run_dir = tmp_path / "run"
    data = TINY_COMMON if mistake.startswith("dataset=") else tiny(cache_dir)  # another dataset: no synthetic knobs
    code, stderr = run_main([*data, mistake, f"hydra.run.dir={run_dir}"], capsys)
    assert code == 2, stderr
    assert len(error_lines(stderr)) == 1 and CONFIG_MISTAKES[mistake] in error_lines(stderr)[0], stderr
    assert "Traceback" not in stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("hydra.run.dir=/proc/anomalib-lite-test/run", "run dir (hydra.run.dir): /proc/anomalib-lite-test/run cannot be created"),
        ("hydra.run.dir=/proc", "run dir (hydra.run.dir): /proc is not writable"),
        ("paths.cache_dir=/proc/anomalib-lite-cache", "paths.cache_dir: /proc/anomalib-lite-cache cannot be created"),
    ],
)
def test_unwritable_folders_are_named(setting: str, expected: str, tmp_path: Path, cache_dir: Path, capsys) -> None:
    args = [*tiny(cache_dir), f"hydra.run.dir={tmp_path / 'run'}", setting]
    code, stderr = run_main(args, capsys)
    assert code == 2 and len(error_lines(stderr)) == 1 and expected in error_lines(stderr)[0], stderr


# -- the run dir: never reused by accident, never left half-replaced ----------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, list[str]]:
    """A tiny finished PatchCore run on its own copy of the data, and the arguments that made it."""
    base = tmp_path_factory.mktemp("finished")
    generate_category(base / "data", "weave", image_size=64, num_train=8, num_test_good=2, num_test_per_defect=1)
    args = [
        "dataset=mvtec", f"dataset.root={base / 'data'}", "dataset.category=weave", *TINY_COMMON,
        "dataset.image_size=64", "dataset.crop_size=null", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={base / 'run'}",
    ]
    GlobalHydra.instance().clear()
    argv, sys.argv = sys.argv, ["anomalib-lite", *args]
    try:
        main()
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    assert (base / "run" / "metrics.json").is_file()
    return base, args


def test_a_finished_run_is_not_overwritten(finished_run, capsys) -> None:
    base, args = finished_run
    before = tree_digest(base / "run")
    code, stderr = run_main(args, capsys)
    assert code == 2 and "holds a finished run (metrics.json): pass overwrite=true" in error_lines(stderr)[0], stderr
    assert tree_digest(base / "run") == before


def test_a_failed_overwrite_leaves_the_earlier_run_intact(finished_run, capsys) -> None:
    base, args = finished_run
    before = tree_digest(base / "run")
    broken = base / "data" / "weave" / "test" / "hole" / "000.png"
    original = broken.read_bytes()
    broken.write_bytes(original[: len(original) // 2])  # truncated: its header still reads
    try:
        code, stderr = run_main([*args, "overwrite=true"], capsys)
    finally:
        broken.write_bytes(original)
    assert code == 2 and "cannot read image" in error_lines(stderr)[0] and "000.png" in error_lines(stderr)[0], stderr
    assert tree_digest(base / "run") == before
    assert "the run failed: cannot read image" in (base / "run" / STAGING / "train.log").read_text()


def test_overwrite_replaces_a_finished_run_once_the_new_one_succeeds(finished_run, capsys) -> None:
    """The earlier run's own files are replaced; a file the user put among them is not the run's, and stays."""
    base, args = finished_run
    mine = base / "run" / "heatmaps" / "mine.png"
    mine.write_bytes(b"the user's")
    code, stderr = run_main([*args, "overwrite=true", "seed=1"], capsys)
    assert code == 0, stderr
    assert json.loads((base / "run" / "metrics.json").read_text())["seed"] == 1
    assert mine.read_bytes() == b"the user's" and not (base / "run" / STAGING).exists()
    log = (base / "run" / "train.log").read_text()
    assert "fitting on" in log and "image_auroc" in log


def test_a_failed_run_into_a_new_dir_says_why(tmp_path: Path, cache_dir: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    code, stderr = run_main([*tiny(cache_dir), "dataset.num_train=1", f"hydra.run.dir={run_dir}"], capsys)
    assert code == 2 and "at least 2 are needed" in error_lines(stderr)[0], stderr
    assert "the run failed:" in (run_dir / "train.log").read_text()
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoints").exists()


# -- data mistakes -------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_category(tmp_path: Path) -> Path:
    return generate_category(tmp_path / "data", "weave", image_size=64, num_train=6, num_test_good=2, num_test_per_defect=1)


def test_an_image_over_the_decompression_guard_is_one_line(tiny_category: Path, monkeypatch, capsys, cache_dir: Path) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64 x 64 image is then "too large"
    args = ["dataset=mvtec", f"dataset.root={tiny_category.parent}", "dataset.category=weave", *TINY_COMMON,
            "dataset.image_size=64", "dataset.crop_size=null", f"hydra.run.dir={tiny_category.parent.parent / 'run'}"]
    code, stderr = run_main(args, capsys)
    assert code == 2 and "too large to decode safely" in error_lines(stderr)[0], stderr


def test_folder_with_the_same_normal_and_abnormal_dir_is_refused(tiny_category: Path) -> None:
    good = tiny_category / "train" / "good"
    with pytest.raises(UserInputError, match="dataset.abnormal_dir is dataset.normal_dir"):
        FolderDataModule(normal_dir=good, abnormal_dir=str(good) + "/", num_workers=0).setup()


def test_no_validation_image_is_a_clear_error(tmp_path: Path) -> None:
    category = generate_category(tmp_path, "weave", image_size=64, num_train=1, num_test_good=1, num_test_per_defect=1)
    with pytest.raises(UserInputError, match="has 1 normal training image: at least 2 are needed"):
        MVTecDataModule(root=tmp_path, category=category.name, num_workers=0).setup()


def test_small_images_are_reported_as_upscaled(tiny_category: Path, caplog) -> None:
    with caplog.at_level("WARNING"):
        MVTecDataModule(root=tiny_category.parent, category="weave", image_size=128, num_workers=0).setup()
    assert "images as small as 64x64 are upscaled to the image size 128x128" in caplog.text


@pytest.mark.parametrize("weights", ["resnet34", "resnet50"])
def test_another_architectures_weights_are_refused_in_one_short_line(weights: str, tmp_path: Path) -> None:
    path = tmp_path / f"{weights}.pth"
    torch.save(timm.create_model(weights, pretrained=False).state_dict(), path)
    with pytest.raises(UserInputError, match="another architecture") as error:
        create_backbone("resnet18", str(path), features_only=True, out_indices=[1, 2])
    assert len(str(error.value)) < 300 and "\n" not in str(error.value)


# -- image and mask reading ------------------------------------------------------------------------------
def write_png16(path: Path, array: np.ndarray) -> None:
    """A 16-bit grey PNG (Pillow writes those itself)."""
    Image.fromarray(array.astype(np.uint16)).save(path)


def test_16_bit_and_float_images_keep_their_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb8 = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb8).save(tmp_path / "8bit.png")
    tifffile.imwrite(tmp_path / "16bit.tif", rgb8.astype(np.uint16) * 257)
    tifffile.imwrite(tmp_path / "float.tif", rgb8.astype(np.float32) / 255)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb8.astype(np.uint16) * 257, -1, 0), planarconfig="separate")
    grey = rgb8[..., 0].astype(np.uint16) * 257
    write_png16(tmp_path / "grey16.png", grey)
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tiff:  # multi-page: the first page is the image
        tiff.write(rgb8.astype(np.uint16) * 257)
        tiff.write(np.zeros_like(rgb8, dtype=np.uint16))
    expected = rgb8.astype(np.float32) / 255
    for name in ("16bit.tif", "float.tif", "planar.tif", "pages.tif"):
        np.testing.assert_allclose(read_image(tmp_path / name), expected, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(read_image(tmp_path / "grey16.png")[..., 1], expected[..., 0], atol=1e-6)
    # Resized, the 16-bit file and the 8-bit one differ by the 8-bit path's rounding at most (Pillow
    # resizes 8-bit images in fixed point: within one grey level).
    resize = ImageResize(24)
    eight, sixteen = resize.to_tensor(read_image(tmp_path / "8bit.png")), resize.to_tensor(read_image(tmp_path / "16bit.tif"))
    assert (eight - sixteen).abs().max() <= 1 / 255 + 1e-6


def test_float_images_outside_the_unit_range_are_scaled_and_reported(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "raw.tif", np.linspace(100, 4000, 64, dtype=np.float32).reshape(8, 8))
    image = read_image(tmp_path / "raw.tif")
    assert image.min() == 0 and image.max() == 1


@pytest.mark.parametrize("encoding", ["0/255", "0/1", "soft", "16-bit"])
def test_masks_read_the_same_whatever_their_encoding(encoding: str, tmp_path: Path) -> None:
    defect = np.zeros((20, 30), dtype=bool)
    defect[5:12, 8:20] = True
    if encoding == "16-bit":
        write_png16(tmp_path / "mask.png", defect * 65535)
    else:
        values = {"0/255": defect * 255, "0/1": defect * 1, "soft": np.where(defect, 180, 0)}[encoding]
        if encoding == "soft":
            values[5, 8:20] = 40  # an anti-aliased edge is defect too
        Image.fromarray(values.astype(np.uint8)).save(tmp_path / "mask.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), defect.astype(np.uint8))


def test_masks_as_0_1_give_the_pixel_metrics_of_0_255(tmp_path: Path, caplog) -> None:
    category = generate_category(tmp_path / "data", "weave", image_size=64, num_train=6, num_test_good=2, num_test_per_defect=1)
    reference = MVTecDataModule(root=category.parent, category="weave", image_size=64, num_workers=0)
    reference.setup()
    for mask in (category / "ground_truth").rglob("*.png"):
        Image.fromarray((np.asarray(Image.open(mask)) > 0).astype(np.uint8)).save(mask)
    with caplog.at_level("INFO"):
        zero_one = MVTecDataModule(root=category.parent, category="weave", image_size=64, num_workers=0)
        zero_one.setup()
    assert "masks hold the values 0, 1, not 0/255" in caplog.text
    for a, b in zip(reference.test_dataloader(), zero_one.test_dataloader()):
        assert torch.equal(a.mask, b.mask) and a.mask.any()


def test_empty_defect_masks_are_counted_and_pixel_metrics_say_why(tmp_path: Path, caplog) -> None:
    category = generate_category(tmp_path / "data", "weave", image_size=64, num_train=6, num_test_good=2, num_test_per_defect=1)
    for mask in (category / "ground_truth").rglob("*.png"):
        Image.new("L", Image.open(mask).size).save(mask)
    datamodule = MVTecDataModule(root=category.parent, category="weave", image_size=64, num_workers=0)
    with caplog.at_level("WARNING"):
        datamodule.setup()
    assert len(datamodule.report.empty_masks) == 4 and "4 of 4 defect masks have no pixel above" in caplog.text
    assert "none of the 4 defect masks has a pixel above" in datamodule.pixel_metrics_note()


def test_images_differing_only_by_extension_get_a_heatmap_each(tiny_category: Path) -> None:
    from anomalib_lite.visualization import heatmap_name

    png = tiny_category / "test" / "good" / "000.png"
    shutil.copy(png, png.with_suffix(".jpg"))
    names = [heatmap_name(p.name) for p in sorted((tiny_category / "test" / "good").glob("000.*"))]
    assert len(set(names)) == 2
