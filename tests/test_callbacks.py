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
from anomalib_lite.models.components import AnomalyModule, AnomalyOutput


class _Fitted:
    """The part of an AnomalyModule the heatmap export uses: the fitted threshold and colour scale."""

    image_threshold = torch.tensor(0.5)

    @staticmethod
    def colour_scale() -> tuple[float, float, float]:
        return 0.0, 0.5, 1.0

    @staticmethod
    def normalize_anomaly_map(anomaly_map: torch.Tensor, top: float | None = None) -> torch.Tensor:
        return (anomaly_map / (top or 1.0)).clamp(0, 1)


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
        f"image score {float(output.pred_score[1]):.3g}, image threshold 0.5: {'ANOMALOUS' if anomalous else 'normal'}",
        scale=(0.0, 0.5, 1.0), anomalous=anomalous,
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


class _Scored(AnomalyModule):
    """The module base alone (its torch model is never called here)."""

    model_class = torch.nn.Identity


def test_the_colour_scale_tops_at_a_high_quantile_of_the_validation_maps() -> None:
    """Bottom: the median normal pixel; 0.5: the pixel threshold; top: the 99.9th percentile of every
    validation map (normal and synthetic), so defects above the threshold keep their shape."""
    generator = torch.Generator().manual_seed(0)
    normal = torch.rand(4, 16, 16, generator=generator)
    synthetic = 10 * torch.rand(4, 16, 16, generator=generator)
    module = _Scored()
    module.fit_thresholds(normal.flatten(1).amax(1), normal)
    module.fit_colour_scale(torch.cat([normal, synthetic]))
    floor, threshold, top = module.colour_scale()
    everything = torch.cat([normal, synthetic]).flatten().numpy()
    assert threshold == pytest.approx(float(normal.max()))
    assert top == pytest.approx(float(np.quantile(everything, 0.999, method="inverted_cdf")))
    assert top > 2 * threshold - floor  # the symmetric scale would have saturated the synthetic defects
    values = torch.tensor([floor, (floor + threshold) / 2, threshold, (threshold + top) / 2, top, 2 * top])
    torch.testing.assert_close(module.normalize_anomaly_map(values), torch.tensor([0, 0.25, 0.5, 0.75, 1, 1]))
    # A checkpoint from before the top was fitted keeps its symmetric scale.
    module.pixel_ceiling.fill_(float("nan"))
    assert module.colour_scale()[2] == pytest.approx(2 * threshold - floor)


def test_the_sheets_scale_reaches_up_to_the_test_maps(tmp_path: Path) -> None:
    """Test maps far above the validation-fitted top: the sheets' top is their 99.9th percentile (said
    in the footer), so a defect is drawn with its gradient instead of one saturated colour."""
    callback = HeatmapExport(tmp_path, max_per_type=None, workers=1, grid_size=0)
    callback.on_test_epoch_start(_Trainer(), _Fitted())
    batch, output = _batch(4, 0)
    output = AnomalyOutput(output.pred_score, output.anomaly_map * 10)  # up to 10: the fitted top is 1
    callback.on_test_batch_end(_Trainer(), _Fitted(), output, batch, 0)
    (low, threshold, top), source = callback.colour_scale(_Trainer(), _Fitted())
    everything = output.anomaly_map.flatten().numpy()
    assert (low, threshold, source) == (0.0, 0.5, "the test maps")
    assert top == pytest.approx(float(np.quantile(everything, 0.999, method="inverted_cdf")), rel=1e-6)
    callback.on_test_epoch_end(_Trainer(), _Fitted())
    expected = render_heatmap(
        batch.image[1], batch.mask[1], (output.anomaly_map[1] / top).clamp(0, 1), "hole/001.png",
        f"image score {float(output.pred_score[1]):.3g}, image threshold 0.5: "
        f"{'ANOMALOUS' if output.pred_score[1] > 0.5 else 'normal'}",
        scale=(0.0, 0.5, top), anomalous=bool(output.pred_score[1] > 0.5), top_source="the test maps",
    )
    assert np.array_equal(np.asarray(Image.open(tmp_path / "hole" / "001_png.png")), np.asarray(expected))
