"""BTAD, VisA and DAGM read in their published layouts, from small copies the tests write in
those formats (no download): splits, labels, mask conventions, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_lite.data import BTADDataModule, DAGMDataModule, VisADataModule
from anomalib_lite.errors import UserInputError

SIZE = 24


def _image(path: Path, value: int, grey: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((SIZE, SIZE) if grey else (SIZE, SIZE, 3), value, dtype=np.uint8)
    Image.fromarray(array).save(path)


def _mask(path: Path, on: int = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((SIZE, SIZE), dtype=np.uint8)
    array[4:10, 4:10] = on
    Image.fromarray(array).save(path)


def _setup(module):  # noqa: ANN001, ANN202
    module.setup()
    return module


def test_btad_layout_with_bmp_and_png_masks(tmp_path: Path) -> None:
    category = tmp_path / "03"
    for i in range(6):
        _image(category / "train" / "ok" / f"{i:04d}.bmp", 100 + i)
    _image(category / "test" / "ok" / "0000.bmp", 90)
    _image(category / "test" / "ko" / "0000.bmp", 200)
    _image(category / "test" / "ko" / "0001.bmp", 210)
    _mask(category / "ground_truth" / "ko" / "0000.bmp")
    _mask(category / "ground_truth" / "ko" / "0001.png")
    datamodule = _setup(BTADDataModule(tmp_path, "03", image_size=SIZE, num_workers=0, val_ratio=0.2))
    assert len(datamodule.train_samples) + len(datamodule.val_samples) == 6
    anomalous = [s for s in datamodule.test_samples if s.label == 1]
    assert [s.mask_path.name for s in anomalous] == ["0000.bmp", "0001.png"] and datamodule.has_masks
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.mask.sum() == 2 * 36  # both masks read, 6 x 6 defect pixels each
    with pytest.raises(UserInputError, match=r"category '01' not found .*BTAD.*categories with that layout there: 03"):
        _setup(BTADDataModule(tmp_path, "01", num_workers=0))
    (category / "ground_truth" / "ko" / "0000.bmp").unlink()
    with pytest.raises(UserInputError, match="no mask for test image"):
        _setup(BTADDataModule(tmp_path, "03", num_workers=0))


def test_visa_layout_from_its_split_csv_with_zero_one_masks(tmp_path: Path) -> None:
    lines = ["object,split,label,image,mask"]
    for i in range(5):
        _image(tmp_path / "candle" / "Data" / "Images" / "Normal" / f"{i:04d}.JPG", 120 + i)
        lines.append(f"candle,{'train' if i < 4 else 'test'},normal,candle/Data/Images/Normal/{i:04d}.JPG,")
    _image(tmp_path / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG", 30)
    _mask(tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "000.png", on=1)  # VisA: 0 and 1
    lines.append("candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png")
    _image(tmp_path / "pcb1" / "Data" / "Images" / "Normal" / "0000.JPG", 50)
    lines.append("pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    datamodule = _setup(VisADataModule(tmp_path, "candle", image_size=SIZE, num_workers=0, val_ratio=0.25))
    assert len(datamodule.train_samples) + len(datamodule.val_samples) == 4
    assert [(s.label, s.defect_type) for s in datamodule.test_samples] == [(0, "good"), (1, "anomaly")]
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.mask[1].sum() == 36 and batch.mask[0].sum() == 0  # value 1 is defect (above threshold 0)
    with pytest.raises(UserInputError, match=r"category 'bottle' is not in .*1cls.csv \(categories: candle, pcb1\)"):
        _setup(VisADataModule(tmp_path, "bottle", num_workers=0))
    with pytest.raises(UserInputError, match=r"no VisA split file .*expected <root>/split_csv/1cls.csv"):
        _setup(VisADataModule(tmp_path / "candle", "candle", num_workers=0))


def test_dagm_layout_with_labels_file_and_ellipse_masks(tmp_path: Path) -> None:
    category = tmp_path / "Class1"
    for split, count, defective in (("Train", 6, {4}), ("Test", 4, {1, 2})):
        rows = ["1"]
        for i in range(count):
            name = f"{i:04d}.PNG"
            _image(category / split / name, 80 + i, grey=True)
            if i in defective:
                _mask(category / split / "Label" / f"{i:04d}_label.PNG")
                rows.append(f"{i + 1}\t1\t{name}\t0\t{i:04d}_label.PNG")
            else:
                rows.append(f"{i + 1}\t0\t{name}\t0\t")
        (category / split / "Label" / "Labels.txt").write_text("\n".join(rows) + "\n")
    datamodule = _setup(DAGMDataModule(tmp_path, "Class1", image_size=SIZE, num_workers=0, val_ratio=0.2))
    training = {s.image_path.name for s in datamodule.train_samples + datamodule.val_samples}
    assert training == {"0000.PNG", "0001.PNG", "0002.PNG", "0003.PNG", "0005.PNG"}  # the defective 0004 left out
    assert [s.label for s in datamodule.test_samples] == [0, 1, 1, 0]
    assert datamodule.test_samples[1].mask_path.name == "0001_label.PNG"
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape[1] == 3 and batch.mask[1].sum() == 36  # grey PNGs become RGB
    (category / "Test" / "Label" / "Labels.txt").write_text("1\n1\tx\t0000.PNG\t0\t\n")
    with pytest.raises(UserInputError, match="unexpected line"):
        _setup(DAGMDataModule(tmp_path, "Class1", num_workers=0))
    with pytest.raises(UserInputError, match=r"category 'Class2' not found .*DAGM 2007"):
        _setup(DAGMDataModule(tmp_path, "Class2", num_workers=0))
