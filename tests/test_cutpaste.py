"""CutPaste: its two augmentations, the Gaussian density, dense patches and the schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from anomalib_lite.data.anomaly_synthesis import CutPasteSynthesizer
from anomalib_lite.models.components.schedules import cosine
from anomalib_lite.models.cutpaste.torch_model import GaussianDensity, patch_positions


def _images(seed: int, count: int = 6, size: int = 64) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def test_cutpaste_pastes_a_crop_of_the_same_image_with_the_papers_area_and_aspect() -> None:
    images = _images(0)
    synthesizer = CutPasteSynthesizer("cutpaste", color_jitter=0.0, seed=1)
    out, masks, has_anomaly = synthesizer(images)
    assert has_anomaly.all()
    for index in range(len(images)):
        top, left, bottom, right = _box(masks[index])
        height, width = bottom - top, right - left
        assert masks[index].sum() == height * width  # one rectangle
        assert 0.02 * 64 * 64 * 0.8 <= height * width <= 0.15 * 64 * 64 * 1.2
        assert 0.3 / 1.5 <= width / height <= 3.3 * 1.5  # log-uniform in [0.3, 3.3], rounded to pixels
        patch = out[index, :, top:bottom, left:right]
        # Without colour jitter the patch is an exact crop of the same image somewhere.
        assert any(
            torch.equal(patch, images[index, :, y : y + height, x : x + width])
            for y in range(65 - height) for x in range(65 - width)
        )
        outside = (masks[index] == 0).expand_as(images[index])
        assert torch.equal(out[index][outside], images[index][outside])
    again = CutPasteSynthesizer("cutpaste", color_jitter=0.0, seed=1)(images)
    assert torch.equal(again.images, out)


def test_scars_are_thin_rotated_and_jitter_changes_the_colours() -> None:
    images = _images(1, count=16, size=96)
    out, masks, has_anomaly = CutPasteSynthesizer("scar", seed=0)(images)
    assert has_anomaly.all()
    areas = masks.flatten(1).sum(1)
    # 2-16 x 10-25 px, rotated with nearest sampling: about the same area.
    assert float(areas.min()) >= 2 * 10 * 0.6 and float(areas.max()) <= 16 * 25 * 1.4
    boxes = [_box(m) for m in masks]
    slanted = [b for b, m in zip(boxes, masks) if (b[2] - b[0]) * (b[3] - b[1]) > 1.3 * float(m.sum())]
    assert len(slanted) >= 4  # rotated scars fill only part of their bounding box
    jittered = CutPasteSynthesizer("cutpaste", color_jitter=0.5, seed=3)(images)
    plain = CutPasteSynthesizer("cutpaste", color_jitter=0.0, seed=3)(images)
    assert not torch.equal(jittered.images, plain.images)
    with pytest.raises(ValueError, match="kind"):
        CutPasteSynthesizer("blur")


def test_gaussian_density_is_the_ledoit_wolf_mahalanobis_distance() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(40, 12)) @ rng.normal(size=(12, 12))
    test = rng.normal(size=(5, 12)) * 3
    density = GaussianDensity(12)
    density.fit(torch.from_numpy(train).float())
    expected = np.sqrt(LedoitWolf().fit(train).mahalanobis(test))
    np.testing.assert_allclose(density(torch.from_numpy(test).float()).numpy(), expected, rtol=1e-3)


def test_dense_patches_cover_every_pixel() -> None:
    assert patch_positions(100, 64, 16) == [0, 16, 32, 36]
    assert patch_positions(64, 64, 16) == [0]
    assert patch_positions(96, 64, 16) == [0, 16, 32]


def test_cosine_schedule_spans_the_run() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.03)
    scheduler = cosine(optimizer, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.03)
    assert rates[5] == pytest.approx(0.03 * (1 + math.cos(math.pi * 0.5)) / 2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_dense_patches_are_the_crops_at_those_positions() -> None:
    from anomalib_lite.models.cutpaste.torch_model import CutPasteModel

    model = CutPasteModel.__new__(CutPasteModel)  # only the patch geometry is needed
    torch.nn.Module.__init__(model)
    model.patch_size, model.patch_stride = 16, 8
    images = torch.rand(2, 3, 40, 44, generator=torch.Generator().manual_seed(0))
    patches, ys, xs = model._patches(images)
    assert (ys, xs) == ([0, 8, 16, 24], [0, 8, 16, 24, 28])
    expected = torch.stack([
        torch.stack([images[b, :, y : y + 16, x : x + 16] for y in ys for x in xs]) for b in range(2)
    ])
    assert torch.equal(patches, expected)
