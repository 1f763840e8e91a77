"""The model carries its preprocessing: the Python API and `anomalib-lite-predict` score raw images
(any size, uint8 or [0, 1]) as the run scored its test images."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_lite import predict
from anomalib_lite.engine.checkpoint import read_checkpoint
from anomalib_lite.errors import UserInputError


def _run_scores(run_dir: Path) -> dict[str, float]:
    return {row["image_path"]: float(row["score"]) for row in csv.DictReader((run_dir / "predictions.csv").open())}


def test_the_checkpoint_carries_the_resize_and_the_method(resized_run: Path) -> None:
    stored = read_checkpoint(resized_run / "checkpoints" / "model.ckpt")
    assert stored["anomalib_lite"] == {
        "method_class": "anomalib_lite.models.patchcore.lightning_model.Patchcore",
        "preprocessing": {"image_size": [96, 96], "crop_size": [80, 80]},
    }


def test_python_api_scores_raw_images_as_the_run(resized_run: Path) -> None:
    """Images at their file size (128 px), uint8 or float in [0, 1], score as in predictions.csv."""
    model = predict.load_model(resized_run)
    scores = _run_scores(resized_run)
    paths = sorted(scores)[:6]
    raw = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1) for p in paths])
    assert raw.shape[-2:] == (128, 128)
    with torch.no_grad():
        as_uint8 = model(raw)
        as_float = model(raw.float() / 255)
        single = model(raw[0])  # 3 x H x W: one image
    expected = torch.tensor([scores[p] for p in paths])
    torch.testing.assert_close(as_uint8.pred_score, expected, rtol=1e-5, atol=1e-5)
    assert as_uint8.anomaly_map.shape == (6, 80, 80)
    torch.testing.assert_close(as_float.pred_score, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single.pred_score, expected[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("images", "words"),
    [
        (torch.zeros(2, 1, 64, 64), "got shape (2, 1, 64, 64); a grey image: images.expand(-1, 3, -1, -1)"),
        (torch.zeros(2, 64, 64, 3), "channels last? use images.permute(0, 3, 1, 2)"),
        (torch.zeros(2, 4, 64, 64), "images must be RGB, B x 3 x H x W or 3 x H x W; got shape (2, 4, 64, 64)"),
        (torch.full((1, 3, 64, 64), 200.0), "float images must lie in [0, 1], got values from 200 to 200"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.int32), "images must be uint8 (0-255) or float in [0, 1], got torch.int32"),
    ],
)
def test_python_api_refuses_what_it_cannot_score(resized_run: Path, images: torch.Tensor, words: str) -> None:
    model = predict.load_model(resized_run)
    with pytest.raises(UserInputError) as error:
        model(images)
    assert words in str(error.value)


def test_predict_command_on_a_folder(resized_run: Path, tmp_path: Path, capsys) -> None:
    """The run's test folder through the command: the run's scores to 1e-5, one heatmap per image
    (named with its extension, in its defect folder); a second call does not overwrite silently."""
    scores = _run_scores(resized_run)
    test_dir = Path(next(iter(scores))).parent.parent
    output = tmp_path / "predicted"
    assert predict.main([str(resized_run), str(test_dir), "--output", str(output), "--workers", "0"]) == 0
    rows = list(csv.DictReader((output / "predictions.csv").open()))
    assert {row["image_path"] for row in rows} == set(scores)
    for row in rows:
        assert float(row["score"]) == pytest.approx(scores[row["image_path"]], rel=1e-5)
        assert row["folder"] == Path(row["image_path"]).parent.name
    heatmaps = sorted(p.relative_to(output / "heatmaps").as_posix() for p in (output / "heatmaps").rglob("*.png"))
    assert heatmaps == sorted(f"{Path(p).parent.name}/{Path(p).stem}_png.png" for p in scores)
    summary = capsys.readouterr().out
    assert f"{len(rows)} images scored" in summary and str(output / "predictions.csv") in summary

    before = (output / "predictions.csv").read_bytes()
    assert predict.main([str(resized_run), str(test_dir), "--output", str(output)]) == 2
    assert "already holds predictions.csv: pass --overwrite" in capsys.readouterr().err
    assert (output / "predictions.csv").read_bytes() == before
    assert predict.main([str(resized_run), str(test_dir), "--output", str(output), "--overwrite", "--max-heatmaps", "0"]) == 0
    assert not (output / "heatmaps").exists()  # replaced: no stale heatmaps of the earlier call


def test_predict_default_output_is_inside_the_run(resized_run: Path, tmp_path: Path) -> None:
    image = tmp_path / "line" / "part.png"
    image.parent.mkdir()
    Image.new("L", (300, 200), 90).save(image)  # grey, another size and aspect than the training images
    assert predict.main([str(resized_run / "checkpoints" / "model.ckpt"), str(image.parent), "--workers", "0"]) == 0
    rows = list(csv.DictReader((resized_run / "predict" / "line" / "predictions.csv").open()))
    assert [row["image_path"] for row in rows] == [str(image)] and np.isfinite(float(rows[0]["score"]))


@pytest.mark.parametrize(
    ("arguments", "line"),
    [
        (["{run}", "{tmp}/nowhere"], "no such image folder or file: {tmp}/nowhere"),
        (["{run}", "{tmp}/empty"], "no images (.png, .jpg"),
        (["{tmp}/empty", "{tmp}/empty"], "{tmp}/empty holds no checkpoints/model.ckpt"),
        (["{tmp}/none.ckpt", "{tmp}/empty"], "no such run folder or checkpoint: {tmp}/none.ckpt"),
        (["{tmp}/bad.ckpt", "{tmp}/broken"], "cannot read checkpoint {tmp}/bad.ckpt"),
        (["{run}", "{tmp}/broken", "--output", "{tmp}/out"], "cannot read image {tmp}/broken/cut.png"),
        (["{run}", "{tmp}/empty", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["{run}", "{tmp}/broken", "--output", "/proc/predictions"], "--output: /proc/predictions cannot be created"),
    ],
)
def test_predict_mistakes_are_one_line(resized_run: Path, tmp_path: Path, capsys, arguments: list[str], line: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "broken" / "cut.png")
    (tmp_path / "broken" / "cut.png").write_bytes((tmp_path / "broken" / "cut.png").read_bytes()[:60])  # truncated
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    fill = {"run": str(resized_run), "tmp": str(tmp_path)}
    assert predict.main([a.format(**fill) for a in arguments]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    # The message itself after the prefix, not an exception's class name (a worker's error is re-raised as text).
    assert err.startswith("anomalib-lite-predict: error: " + line.format(**fill)), err
