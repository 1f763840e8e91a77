"""Callbacks on hand-made batches: heatmaps written off the loop are the synchronous renders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from anomalib_lite.callbacks import HeatmapExport
from anomalib_lite.data import Item, collate_items
from anomalib_lite.engine import AnomalyModule, PostProcessor
from anomalib_lite.models.components import AnomalyOutput
from anomalib_lite.visualization import _colormap_table, heatmap_name, render_heatmap


class _FittedPostProcessor:
    """The part of a PostProcessor the heatmap export uses: the fitted threshold and colour scale."""

    image_threshold = torch.tensor(0.5)

    @staticmethod
    def colour_scale() -> tuple[float, float, float]:
        return 0.0, 0.5, 1.0

    @staticmethod
    def normalize_anomaly_map(anomaly_map: torch.Tensor, top: float | None = None) -> torch.Tensor:
        return (anomaly_map / (top or 1.0)).clamp(0, 1)


class _Fitted:
    """The part of an AnomalyModule the heatmap export uses: its post-processor."""

    post_processor = _FittedPostProcessor()


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
    post_processor = PostProcessor()
    labels = torch.tensor([0] * 4 + [1] * 4)
    post_processor.fit(torch.cat([normal, synthetic]).flatten(1).amax(1), torch.cat([normal, synthetic]), labels)
    floor, threshold, top = post_processor.colour_scale()
    everything = torch.cat([normal, synthetic]).flatten().numpy()
    assert threshold == pytest.approx(float(normal.max()))
    assert float(post_processor.image_threshold) == pytest.approx(float(normal.flatten(1).amax(1).max()))
    assert floor == pytest.approx(float(normal.flatten().median()))
    assert top == pytest.approx(float(np.quantile(everything, 0.999, method="inverted_cdf")))
    assert top > 2 * threshold - floor  # the symmetric scale would have saturated the synthetic defects
    values = torch.tensor([floor, (floor + threshold) / 2, threshold, (threshold + top) / 2, top, 2 * top])
    torch.testing.assert_close(post_processor.normalize_anomaly_map(values), torch.tensor([0, 0.25, 0.5, 0.75, 1, 1]))
    # A checkpoint from before the top was fitted keeps its symmetric scale.
    post_processor.pixel_ceiling.fill_(float("nan"))
    assert post_processor.colour_scale()[2] == pytest.approx(2 * threshold - floor)


def test_the_post_processor_travels_in_the_state_dict_and_old_checkpoints_load() -> None:
    """The thresholds are the module's `post_processor.*` buffers; a checkpoint written when they
    were top-level buffers (and before the colour scale had a top) loads into the new layout."""
    module = _Scored()
    module.post_processor.fit(torch.tensor([0.1, 0.3, 0.9]), torch.rand(3, 4, 4), torch.tensor([0, 0, 1]))
    state = module.state_dict()
    assert {f"post_processor.{name}" for name in ("image_threshold", "pixel_threshold", "pixel_floor", "pixel_ceiling")} <= set(state)
    old_layout = {"state_dict": {
        "image_threshold": torch.tensor(0.3), "pixel_threshold": torch.tensor(0.8), "pixel_floor": torch.tensor(0.2),
    }}
    restored = _Scored()
    restored.on_load_checkpoint(old_layout)
    restored.load_state_dict(old_layout["state_dict"])
    assert restored.post_processor.is_fitted and float(restored.post_processor.image_threshold) == pytest.approx(0.3)
    assert restored.post_processor.colour_scale() == pytest.approx((0.2, 0.8, 1.4))  # the symmetric scale of old
    assert bool(restored.post_processor.is_anomalous(torch.tensor(0.31))) and not bool(restored.post_processor.is_anomalous(torch.tensor(0.3)))


def test_the_sheets_scale_reaches_up_to_the_test_maps(tmp_path: Path) -> None:
    """Test maps far above the validation-fitted top: the sheets' top is their 99.9th percentile (said
    in the footer), so a defect is drawn with its gradient instead of one saturated colour."""
    callback = HeatmapExport(tmp_path, max_per_type=None, workers=1, grid_size=0)
    callback.on_test_epoch_start(_Trainer(), _Fitted())
    batch, output = _batch(4, 0)
    output = AnomalyOutput(output.pred_score, output.anomaly_map * 10)  # up to 10: the fitted top is 1
    callback.on_test_batch_end(_Trainer(), _Fitted(), output, batch, 0)
    (low, threshold, top), source = callback.colour_scale(_Trainer(), _Fitted().post_processor)
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


@pytest.mark.parametrize("ceiling", [None, float("nan")])
def test_the_post_processors_graph_form_gives_its_verdicts_and_normalised_maps(ceiling: float | None) -> None:
    """`forward` (tensor operations only, what an exported model carries) equals `is_anomalous` and
    `normalize_anomaly_map`, also for a checkpoint without a fitted top (the symmetric scale)."""
    generator = torch.Generator().manual_seed(3)
    maps = 4 * torch.rand(6, 8, 8, generator=generator)
    post_processor = PostProcessor()
    post_processor.fit(maps.flatten(1).amax(1), maps, torch.tensor([0, 0, 0, 1, 1, 1]))
    if ceiling is not None:
        post_processor.pixel_ceiling.fill_(ceiling)
    scores = torch.linspace(0, 5, 6)
    labels, normalized = post_processor(scores, maps * 1.5)
    assert torch.equal(labels, post_processor.is_anomalous(scores)) and bool(labels.any()) and not bool(labels.all())
    torch.testing.assert_close(normalized, post_processor.normalize_anomaly_map(maps * 1.5), rtol=0, atol=1e-6)
