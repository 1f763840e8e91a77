"""Dashboards show what people open them for: curves, test metrics and the heatmap grid, read back
from TensorBoard's event files and W&B's offline run files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_tiny_args
from PIL import Image

from anomalib_lite.callbacks.heatmaps import GRID_TAG, _Tile, select_grid
from anomalib_lite.run_dir import STAGING
from anomalib_lite.train import run


def _tile(score: float, label: int, name: str) -> _Tile:
    return _Tile(0.0, 0, score, label, name, torch.zeros(3, 4, 4), None, torch.zeros(4, 4))


def test_grid_puts_the_worst_verdicts_first() -> None:
    """Threshold 5: false positives by descending score and false negatives by ascending score,
    alternating, then the correct verdicts nearest the threshold; no more than the grid holds."""
    normal = [_tile(s, 0, f"good/{s}") for s in (1, 9, 4, 7, 2)]
    anomalous = [_tile(s, 1, f"bad/{s}") for s in (8, 3, 6, 0)]
    picked = select_grid(normal, anomalous, threshold=5, size=7)
    assert [(t.name, verdict) for t, verdict in picked] == [
        ("good/9", "FALSE POSITIVE"), ("bad/0", "FALSE NEGATIVE"),
        ("good/7", "FALSE POSITIVE"), ("bad/3", "FALSE NEGATIVE"),
        ("good/4", "normal, correct"), ("bad/6", "anomalous, correct"),
        ("good/2", "normal, correct"),
    ]


def test_tensorboard_event_files_hold_curves_metrics_and_the_grid(make_cfg, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(make_cfg("method=fastflow", "method.epochs=2", "method.flow_steps=2", "logger=tensorboard", "dataset.category=disc"))
    out = tmp_path / "run"
    events = sorted((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    reader = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    reader.Reload()
    tags = reader.Tags()
    assert GRID_TAG in tags["images"]
    stored = reader.Images(GRID_TAG)[-1]
    grid = Image.open(io.BytesIO(stored.encoded_image_string))
    assert grid.size == Image.open(out / "heatmaps" / "grid.png").size and grid.size[0] > 500
    assert {"image_auroc", "pixel_auroc", "pixel_aupro", "val_loss", "train_loss_epoch"} <= set(tags["scalars"])
    assert "hp_metric" not in tags["scalars"]  # no placeholder
    assert len(reader.Scalars("train_loss_epoch")) == 2  # one point per epoch
    metrics = json.loads((out / "metrics.json").read_text())
    assert reader.Scalars("image_auroc")[-1].value == pytest.approx(metrics["image_auroc"], abs=1e-6)


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file: a 7-byte header (":W&B", magic, version), then
    LevelDB-log records (crc32, length, type: full/first/middle/last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, pending = path.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B"
    position = 7
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_files_hold_metrics_and_the_grid(make_cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(make_cfg("method=patchcore", "logger=wandb", "dataset.category=disc"))
    out = tmp_path / "run"
    (run_dir,) = (out / "logs" / "wandb").glob("offline-run-*")
    media = sorted((run_dir / "files" / "media" / "images" / "test").glob("heatmaps_worst_first_*.png"))
    assert len(media) == 1
    assert Image.open(media[0]).size == Image.open(out / "heatmaps" / "grid.png").size
    logged: dict[tuple[str, ...], str] = {}
    for record in _wandb_records(next(run_dir.glob("*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            logged.update({tuple(item.nested_key) or (item.key,): item.value_json for item in record.history.item})
    assert json.loads(logged[(GRID_TAG, "_type")]) == "images/separated"
    assert json.loads(logged[(GRID_TAG, "filenames")]) == [media[0].relative_to(run_dir / "files").as_posix()]
    assert float(logged[("image_auroc",)]) == pytest.approx(json.loads((out / "metrics.json").read_text())["image_auroc"], abs=1e-6)


def test_wandb_run_prints_its_files_not_its_chatter(tmp_path: Path, cache_dir: Path) -> None:
    """W&B's own lines stay out of the output (one of them named the staging folder, gone after the
    run); the report names the offline run's folder as it is after the run."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_SILENT")}
    result = subprocess.run(
        [sys.executable, "-m", "anomalib_lite", *cli_tiny_args(cache_dir), "method=padim", "logger=wandb",
         f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert not [line for line in output.splitlines() if line.startswith("wandb:")], output
    (reported,) = [line.split()[1] for line in result.stdout.splitlines() if line.strip().startswith("wandb:")]
    assert Path(reported).is_dir() and Path(reported).parent == tmp_path / "run" / "logs" / "wandb"
    assert STAGING not in reported
