"""`anomalib-lite-export`: one artefact per format that scores raw images as the run did, and a
command that only reads the run and never replaces a file it did not write."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import export_and_score
from PIL import Image

import anomalib_lite
from anomalib_lite import deploy
from anomalib_lite.models.patchcore.torch_model import PatchcoreModel

BIN = Path(sys.executable).parent


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("format", deploy.FORMATS)
def test_the_artefact_scores_the_test_images_as_the_run(format: str, resized_run: Path, tmp_path: Path) -> None:
    """The run's test images at their file size (128 px, uint8): the artefact resizes, crops, scores
    and thresholds them as the run did (predictions.csv): scores within 1e-4 of their range, the
    same verdict for every image, thresholds and colour scale in metadata.json."""
    rows = list(csv.DictReader((resized_run / "predictions.csv").open()))
    images = np.stack([np.asarray(Image.open(row["image_path"]).convert("RGB")).transpose(2, 0, 1) for row in rows])
    assert images.shape[-2:] == (128, 128)
    folder = tmp_path / format
    [(pred_score, anomaly_map, pred_label, normalized_map)] = export_and_score(resized_run, format, folder, np.ascontiguousarray(images))
    assert sorted(p.name for p in folder.iterdir()) == sorted([*deploy.FILES[format], "metadata.json", deploy.EXPORT_RECORD])
    expected = np.array([float(row["score"]) for row in rows])
    assert np.abs(pred_score - expected).max() <= 1e-4 * (expected.max() - expected.min())
    assert pred_label.tolist() == [bool(int(row["predicted_anomalous"])) for row in rows]
    assert anomaly_map.shape == normalized_map.shape == (len(rows), 80, 80)
    assert 0 <= normalized_map.min() and normalized_map.max() <= 1
    metadata = json.loads((folder / "metadata.json").read_text())
    metrics = json.loads((resized_run / "metrics.json").read_text())
    assert metadata["image_threshold"] == pytest.approx(metrics["image_threshold"])
    assert metadata["input"]["resize"] == {"image_size": [96, 96], "crop_size": [80, 80]}
    assert metadata["method"] == "Patchcore" and metadata["run_config"]["method"]["_target_"].endswith("Patchcore")
    checkpoint = resized_run / "checkpoints" / "model.ckpt"
    assert metadata["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_export_reads_the_run_and_replaces_only_its_own_files(resized_run: Path, tmp_path: Path, capsys) -> None:
    before = _files(resized_run)
    output = tmp_path / "artefact"
    assert deploy.main([str(resized_run), "--format", "torchscript", "--output", str(output)]) == 0
    assert deploy.main([str(resized_run), "--format", "torchscript", "--output", str(output)]) == 2
    assert "already holds an export: pass --overwrite" in capsys.readouterr().err
    assert deploy.main([str(resized_run), "--format", "torchscript", "--output", str(output), "--overwrite"]) == 0
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.pt").write_text("a file of the user's")
    assert deploy.main([str(resized_run), "--format", "torchscript", "--output", str(theirs), "--overwrite"]) == 2
    assert "was not written by anomalib-lite-export" in capsys.readouterr().err
    assert (theirs / "model.pt").read_text() == "a file of the user's"
    for inside in (resized_run, resized_run / "checkpoints"):
        assert deploy.main([str(resized_run), "--format", "torchscript", "--output", str(inside)]) == 2
    assert _files(resized_run) == before


def test_a_method_that_is_not_a_fixed_computation_is_refused_in_one_line(
    resized_run: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PatchcoreModel, "not_exportable", "its score is a search")
    assert deploy.main([str(resized_run), "--format", "onnx", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "anomalib-lite-export: error: Patchcore cannot be exported: its score is a search"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("format", deploy.FORMATS)
def test_predict_scores_with_the_artefact_as_with_the_run(format: str, resized_run: Path, tmp_path: Path) -> None:
    """`anomalib-lite-predict EXPORT_DIR images`: the run's test folder gives its predictions.csv
    (scores within 1e-4 of their range, every verdict), and heatmaps."""
    from anomalib_lite import predict

    artefact = tmp_path / "artefact"
    export_and_score(resized_run, format, artefact)
    rows = {row["image_path"]: row for row in csv.DictReader((resized_run / "predictions.csv").open())}
    test_folder = Path(next(iter(rows))).parents[1]
    arguments = [str(artefact), str(test_folder), "--output", str(tmp_path / "out"), "--max-heatmaps", "2"]
    if format == "openvino":  # in a process of its own: see conftest.export_and_score
        result = subprocess.run([str(BIN / "anomalib-lite-predict"), *arguments], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    else:
        assert predict.main(arguments) == 0
    predicted = {row["image_path"]: row for row in csv.DictReader((tmp_path / "out" / "predictions.csv").open())}
    assert set(predicted) == set(rows)
    expected = np.array([float(rows[p]["score"]) for p in rows])
    got = np.array([float(predicted[p]["score"]) for p in rows])
    assert np.abs(got - expected).max() <= 1e-4 * (expected.max() - expected.min())
    assert [predicted[p]["predicted_anomalous"] for p in rows] == [rows[p]["predicted_anomalous"] for p in rows]
    assert len(list((tmp_path / "out" / "heatmaps").rglob("*.png"))) == 2


def test_predict_with_an_onnx_artefact_imports_no_lightning_and_no_method(resized_run: Path, tmp_path: Path) -> None:
    anomalib_lite.export(resized_run, "onnx", tmp_path / "artefact")
    test_folder = Path(next(csv.DictReader((resized_run / "predictions.csv").open()))["image_path"]).parents[1]
    code = (
        "import sys\nfrom anomalib_lite import predict\n"
        f"assert predict.main([{str(tmp_path / 'artefact')!r}, {str(test_folder)!r}, '--output', {str(tmp_path / 'out')!r}]) == 0\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') or m.startswith('anomalib_lite.models')"
        " or m.startswith('anomalib_lite.engine')]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "predictions.csv").is_file()
