"""Callbacks on hand-made batches: heatmaps written off the loop are the synchronous renders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from anomalib_lite.callbacks import HeatmapExport, render_heatmap
from anomalib_lite.callbacks.heatmaps import _colormap_table, heatmap_name
from anomalib_lite.data import Item, collate_items
from anomalib_lite.models.components import AnomalyOutput


class _Fitted:
    """The part of an AnomalyModule the heatmap export uses: the fitted threshold and colour scale."""

    image_threshold = torch.tensor(0.5)
    pixel_floor = torch.tensor(0.0)
    pixel_threshold = torch.tensor(0.5)

    @staticmethod
    def normalize_anomaly_map(anomaly_map: torch.Tensor) -> torch.Tensor:
        return anomaly_map.clamp(0, 1)


class _Trainer:
    world_size = 1
    is_global_zero = True
    global_step = 0
    loggers: list = []


def _batch(count: int, start: int) -> tuple:
    generator = torch.Generator().manual_seed(start)
    items = []
    for i in range(count):
        mask = torch.zeros(24, 32)
        mask[4:9, 5:12] = float(i % 2)
        items.append(Item(torch.rand(3, 24, 32, generator=generator), mask, i % 2, start + i,
                          "hole" if i % 2 else "good", f"/data/{start + i:03d}.png", True))
    output = AnomalyOutput(torch.rand(count, generator=generator), torch.rand(count, 24, 32, generator=generator))
    return collate_items(items), output


def test_heatmap_names_keep_the_extension() -> None:
    assert heatmap_name("000.png") != heatmap_name("000.jpg")
    assert heatmap_name("000.PNG") == "000_PNG.png" != heatmap_name("000.png")  # a.png and a.PNG can share a folder


def test_heatmaps_written_in_the_background_are_the_synchronous_renders(tmp_path: Path) -> None:
    callback = HeatmapExport(tmp_path, max_per_type=3, workers=2)
    callback.on_test_epoch_start(_Trainer(), _Fitted())
    batches = [_batch(4, 0), _batch(4, 10)]
    for index, (batch, output) in enumerate(batches):
        callback.on_test_batch_end(_Trainer(), _Fitted(), output, batch, index)
    callback.on_test_epoch_end(_Trainer(), _Fitted())
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert written == [
        "good/000_png.png", "good/002_png.png", "good/010_png.png", "grid.png",
        "hole/001_png.png", "hole/003_png.png", "hole/011_png.png",
    ]
    batch, output = batches[0]
    anomalous = bool(output.pred_score[1] > 0.5)
    expected = render_heatmap(
        batch.image[1], batch.mask[1], output.anomaly_map[1], "hole/001.png",
        f"score {float(output.pred_score[1]):.3g}, threshold 0.5: {'ANOMALOUS' if anomalous else 'normal'}",
        scale=(0.0, 0.5), anomalous=anomalous,
    )
    assert np.array_equal(np.asarray(Image.open(tmp_path / "hole" / "001_png.png")), np.asarray(expected))
    assert set(callback.report()) == {"heatmaps", "heatmap_seconds"}


@pytest.mark.parametrize("name", ["jet", "viridis", "inferno"])
def test_heatmap_colour_table_is_matplotlibs_lookup(name: str) -> None:
    """The renderer's table lookup gives exactly matplotlib's colours for every value in [0, 1]."""
    heat = np.concatenate([np.linspace(0, 1, 10_001), np.random.default_rng(0).random(10_000)]).astype(np.float32)
    expected = (colormaps[name](heat)[..., :3] * 255).astype(np.float32)
    table = _colormap_table(name)
    assert np.array_equal(table[np.minimum((heat * 256).astype(np.int64), 255)], expected)
