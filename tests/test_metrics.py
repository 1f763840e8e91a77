"""Metric math against scikit-learn, a brute-force reference, and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from anomalib_lite.errors import UserInputError
from anomalib_lite.metrics import (
    aupro,
    auroc,
    average_precision,
    compute_metrics,
    descending_order,
    f1_at_threshold,
    f1_max,
    pro_curve,
)


def test_auroc_matches_sklearn_with_ties_and_large_scores() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(3000) < 0.3
    # Large raw scores (torchmetrics would squash them with a sigmoid) and many ties.
    scores = np.round(rng.normal(80, 20, 3000) + 15 * labels, 0)
    assert auroc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)


def test_f1_max_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(2000) < 0.2
    scores = rng.normal(0, 1, 2000) + labels
    precision, recall, _ = precision_recall_curve(labels, scores)
    expected = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    assert f1_max(scores, labels) == pytest.approx(expected, abs=1e-6)


def test_average_precision_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(2000) < 0.25
    scores = np.round(rng.normal(0, 1, 2000) + labels, 1).astype(np.float32)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-9)


def test_descending_order_of_float32_keys_handles_signs_zeros_and_ties() -> None:
    scores = np.array([0.5, -0.0, 3.0, -2.5, 0.0, 0.5, -1e-30, np.inf, -np.inf, 1e-38, 0.5], dtype=np.float32)
    order, sorted_scores = descending_order(scores)
    expected = np.argsort(-scores.astype(np.float64), kind="stable")
    assert np.array_equal(sorted_scores, scores[expected]) and np.array_equal(scores[order], sorted_scores)
    assert order.tolist()[:4] == [7, 2, 0, 5]  # inf, 3.0, then the tied 0.5s in index order
    rng = np.random.default_rng(0)
    big = rng.normal(size=100_000).astype(np.float32)
    order, sorted_scores = descending_order(big)
    assert np.array_equal(sorted_scores, np.sort(big)[::-1]) and np.array_equal(big[order], sorted_scores)


def test_f1_at_threshold_by_hand() -> None:
    # predictions >= 0.5: [1, 1, 0, 1]; truth [1, 0, 0, 1] -> tp 2, fp 1, fn 0 -> F1 = 4/5
    assert f1_at_threshold([0.9, 0.6, 0.1, 0.5], [1, 0, 0, 1], 0.5) == pytest.approx(0.8)


def test_metrics_refuse_single_class() -> None:
    with pytest.raises(ValueError, match="no anomalous"):
        auroc([0.1, 0.2], [0, 0])
    with pytest.raises(UserInputError, match="no anomalous images"):
        compute_metrics(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), None, None)


# Two 1 x 5 "images". Regions: R1 = image 0 pixels 0-1 (2 px), R2 = image 1 pixel 3 (1 px);
# 7 defect-free pixels. Score 0.7 is shared by R2 and a normal pixel, so the curve has a
# diagonal segment (1/7, 0.25) -> (2/7, 0.75). Curve: (0,0) (0,.25) (1/7,.25) (2/7,.75) (2/7,1) ...
HAND_MAPS = np.array([[[0.9, 0.5, 0.8, 0.1, 0.2]], [[0.3, 0.4, 0.05, 0.7, 0.7]]])
HAND_MASKS = np.array([[[1, 1, 0, 0, 0]], [[0, 0, 0, 1, 0]]])


def test_pro_curve_by_hand() -> None:
    fpr, pro = pro_curve(HAND_MAPS, HAND_MASKS)
    np.testing.assert_allclose(fpr[:5], [0, 0, 1 / 7, 2 / 7, 2 / 7])
    np.testing.assert_allclose(pro[:5], [0, 0.25, 0.25, 0.75, 1.0])
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        # limit on the diagonal between two curve points: PRO(0.2) = 0.25 + 0.5 * (0.2 - 1/7) * 7 = 0.45;
        # area = 0.25/7 + (0.25 + 0.45)/2 * (0.2 - 1/7)
        (0.2, (0.25 / 7 + 0.35 * (0.2 - 1 / 7)) / 0.2),
        # limit between (2/7, 1) and (3/7, 1): area = 1/28 + 1/14 + (0.3 - 2/7)
        (0.3, (1 / 28 + 1 / 14 + 0.3 - 2 / 7) / 0.3),
        (1.0, 23 / 28),
    ],
)
def test_aupro_by_hand(limit: float, expected: float) -> None:
    assert aupro(HAND_MAPS, HAND_MASKS, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)
    assert aupro(torch.tensor(HAND_MAPS), torch.tensor(HAND_MASKS), fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    # Two diagonal pixels are one region: PRO jumps 0 -> 0.5 -> 1.0, not 0 -> 1 per pixel region.
    maps = np.array([[[0.9, 0.0, 0.0], [0.0, 0.8, 0.0], [0.0, 0.0, 0.1]]])
    masks = np.array([[[1, 0, 0], [0, 1, 0], [0, 0, 0]]])
    _, pro = pro_curve(maps, masks)
    np.testing.assert_allclose(pro[:3], [0, 0.5, 1.0])


def _brute_force_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """Threshold at every distinct score, label regions with scipy, integrate, interpolate."""
    structure = np.ones((3, 3))
    regions = []
    for mask in masks:
        labelled, count = ndimage.label(mask, structure=structure)
        regions += [labelled == i for i in range(1, count + 1)]
    image_of_region = []
    for index, mask in enumerate(masks):
        image_of_region += [index] * ndimage.label(mask, structure=structure)[1]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fpr = (predicted & normal).sum() / normal.sum()
        pro = np.mean([(predicted[i] & region).sum() / region.sum() for i, region in zip(image_of_region, regions)])
        points.append((fpr, pro))
    fpr, pro = np.array(points).T
    grid_pro = np.interp(limit, fpr, pro)
    keep = fpr <= limit
    fpr_part, pro_part = np.append(fpr[keep], limit), np.append(pro[keep], grid_pro)
    return float(np.sum((fpr_part[1:] - fpr_part[:-1]) * (pro_part[1:] + pro_part[:-1]) / 2) / limit)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("limit", [0.05, 0.3])
def test_aupro_matches_brute_force(seed: int, limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 12, 12), dtype=np.uint8)
    masks[0, 2:5, 3:7] = 1
    masks[0, 8:10, 8:11] = 1
    masks[1, 5:9, 1:3] = 1
    masks[3, 0:2, 0:12] = 1
    maps = np.round(rng.random(masks.shape) + 0.6 * masks, 2)  # rounding makes ties
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(_brute_force_aupro(maps, masks, limit), abs=1e-9)


@pytest.mark.parametrize("levels", [3, 20])
def test_aupro_on_tie_heavy_maps_equals_the_mvtec_definition(levels: int) -> None:
    """Maps with only a few distinct values (every threshold a big tie), float32, many regions."""
    rng = np.random.default_rng(levels)
    masks = np.zeros((30, 48, 48), dtype=np.uint8)
    for index in range(15):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, 40, 2)
            masks[index, y : y + rng.integers(2, 9), x : x + rng.integers(2, 9)] = 1
    maps = (np.floor((rng.random(masks.shape) + 0.5 * masks) * levels) / levels).astype(np.float32)
    for limit in (0.05, 0.3, 1.0):
        expected = _brute_force_aupro(maps, masks, limit)
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-6)
        whole = compute_metrics(torch.rand(30), torch.tensor([1] * 15 + [0] * 15), torch.from_numpy(maps), torch.from_numpy(masks), fpr_limit=limit)
        assert whole["pixel_aupro"] == pytest.approx(expected, abs=1e-6)  # the full ranking agrees with the top part
        assert whole["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)


def test_aupro_perfect_and_errors() -> None:
    masks = np.zeros((2, 8, 8))
    masks[0, 2:4, 2:4] = 1
    assert aupro(masks.copy(), masks) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="defect region"):
        aupro(np.random.rand(2, 8, 8), np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="N x H x W"):
        aupro(np.random.rand(2, 8, 8), np.zeros((2, 8, 7)))
