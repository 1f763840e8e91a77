"""Anomaly-detection metrics: AUROC, F1-max, average precision and the MVTec AD per-region overlap (AUPRO).

All of them are read off one ranking of the scores: sort once, then cumulative sums of the labels
(and, for the PRO curve, of per-pixel region weights) give every threshold's counts. The three
pixel metrics of a test set (tens of millions of pixels) thus share a single sort, where calling
torchmetrics' AUROC and PR curve and a separate AUPRO would sort three times; the formulas are
the standard ones and the tests hold them against scikit-learn, torchmetrics and a
threshold-by-threshold reference of the MVTec AD definition, ties included.

float32 scores are sorted as packed 64-bit keys (order-preserving score bits, then the index),
which numpy's vectorised sort handles about 8x faster than an argsort.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.integrate import trapezoid

ArrayLike = torch.Tensor | np.ndarray

# 8-connected regions within each mask (as in the MVTec AD evaluation code), none across masks.
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


def _as_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def descending_order(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices that sort the 1-D `scores` from the highest down, the sorted scores).

    Equal scores end up adjacent, in index order.
    """
    if scores.dtype != np.float32 or scores.size >= 2**32:
        order = np.argsort(-scores.astype(np.float64), kind="stable")
        return order, scores[order]
    # Keys of 64 bits: the score's order-preserving bits (high word), the index (low word).
    keys = np.empty(scores.size, dtype=np.uint64)
    words = keys.view(np.uint32).reshape(-1, 2)[:, ::-1] if _BIG_ENDIAN else keys.view(np.uint32).reshape(-1, 2)
    words[:, 0] = np.arange(scores.size, dtype=np.uint32)
    words[:, 1] = _descending_key((scores + np.float32(0)).view(np.uint32))  # + 0: -0.0 and 0.0 get one key
    keys.sort()
    order = words[:, 0].astype(np.intp)
    return order, _descending_key(words[:, 1].copy()).view(np.float32)


_BIG_ENDIAN = np.little_endian is False


def _descending_key(bits: np.ndarray) -> np.ndarray:
    """float32 bits -> uint32 keys whose ascending order is the floats' descending order (an involution).

    Negative floats keep their bits (a larger magnitude is a larger key); non-negative ones flip
    all but the sign bit (a larger value is a smaller key, below every negative's).
    """
    mask = bits >> np.uint32(31)
    mask -= np.uint32(1)  # 0 for negatives, all ones for the rest
    mask &= np.uint32(0x7FFFFFFF)
    return np.bitwise_xor(bits, mask, out=mask)


@dataclass(frozen=True)
class RankedCounts:
    """Counts at every distinct threshold t (scores >= t count as positive), from the highest t down."""

    thresholds: np.ndarray  # distinct scores, descending
    true_positives: np.ndarray  # positives scored >= t
    false_positives: np.ndarray  # negatives scored >= t
    weight_sums: np.ndarray | None  # sum of the positives' weights over positives scored >= t
    num_positives: int
    num_negatives: int

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(false positive rates, true positive rates), starting at (0, 0)."""
        fpr = np.concatenate([[0.0], self.false_positives / max(self.num_negatives, 1)])
        tpr = np.concatenate([[0.0], self.true_positives / max(self.num_positives, 1)])
        return fpr, tpr

    def auroc(self) -> float:
        fpr, tpr = self.roc()
        return float(trapezoid(tpr, fpr))

    def f1_max(self) -> float:
        """Best F1 over all thresholds: 2 TP / (TP + FP + P)."""
        f1 = 2 * self.true_positives / (self.true_positives + self.false_positives + self.num_positives)
        return float(f1.max())

    def average_precision(self) -> float:
        """sum over thresholds of (recall step) x precision (scikit-learn's definition)."""
        precision = self.true_positives / (self.true_positives + self.false_positives)
        recall_steps = np.diff(np.concatenate([[0], self.true_positives])) / self.num_positives
        return float(np.sum(recall_steps * precision))


def ranked_counts(
    scores: ArrayLike,
    labels: ArrayLike,
    positive_weights: Callable[[np.ndarray], np.ndarray] | None = None,
    totals: tuple[int, int] | None = None,
) -> RankedCounts:
    """One sort of `scores` (any shape; higher = more anomalous) against binary `labels`.

    `positive_weights(flat indices of positives) -> their weights`, optional, are summed in rank
    order: the PRO curve's region weights. Only positives are looked up (few, in a test set).
    `totals` = (positives, negatives) of the whole set when `scores` are only its top part.
    """
    scores_np = _as_numpy(scores).reshape(-1)
    if not np.issubdtype(scores_np.dtype, np.floating):
        scores_np = scores_np.astype(np.float64)
    if np.isnan(scores_np).any():
        raise ValueError("scores contain NaN")
    labels_np = _as_numpy(labels).reshape(-1) > 0
    if labels_np.size != scores_np.size:
        raise ValueError(f"{scores_np.size} scores but {labels_np.size} labels")
    num_positives, num_negatives = totals or (int(labels_np.sum()), labels_np.size - int(labels_np.sum()))
    order, sorted_scores = descending_order(scores_np)
    sorted_labels = labels_np[order]
    true_positives = np.cumsum(sorted_labels, dtype=np.int64)
    weight_sums = None
    if positive_weights is not None:
        # Cumulative weight of the first k positives in rank order; a threshold's sum is that at its TP count.
        weight_sums = np.concatenate([[0.0], np.cumsum(positive_weights(order[sorted_labels]))])
    del order, sorted_labels
    # Samples with the same score cross a threshold together: keep the last index of each tie.
    last = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    true_positives = true_positives[last]
    return RankedCounts(
        thresholds=sorted_scores[last],
        true_positives=true_positives,
        false_positives=last + 1 - true_positives,
        weight_sums=weight_sums[true_positives] if weight_sums is not None else None,
        num_positives=num_positives,
        num_negatives=num_negatives,
    )


def _check_both_classes(counts: RankedCounts, what: str) -> None:
    if counts.num_positives == 0 or counts.num_negatives == 0:
        kind = "anomalous" if counts.num_positives == 0 else "normal"
        raise ValueError(f"{what} needs both normal and anomalous samples, but there are no {kind} ones")


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of `scores` (higher = more anomalous) against binary `labels`."""
    counts = ranked_counts(scores, labels)
    _check_both_classes(counts, "AUROC")
    return counts.auroc()


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Best F1 score over all thresholds (the threshold-free F1 reported in the literature)."""
    counts = ranked_counts(scores, labels)
    _check_both_classes(counts, "F1-max")
    return counts.f1_max()


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision (area under the precision-recall curve, step-wise)."""
    counts = ranked_counts(scores, labels)
    _check_both_classes(counts, "average precision")
    return counts.average_precision()


def f1_at_threshold(scores: ArrayLike, labels: ArrayLike, threshold: float) -> float:
    """F1 of the decision `score >= threshold` (e.g. a threshold fitted on validation data)."""
    predicted = _as_numpy(scores).reshape(-1).astype(np.float32) >= threshold
    actual = _as_numpy(labels).reshape(-1) > 0
    true_pos = int((predicted & actual).sum())
    denominator = int(predicted.sum()) + int(actual.sum())
    return 2 * true_pos / denominator if denominator else 0.0


def region_weights(masks: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """PRO weights of the defect pixels of N x H x W boolean masks, and the number of regions.

    Returns a lookup (flat pixel indices -> weights): a defect pixel weighs
    1 / (|its 8-connected region| x number of regions), so that the weights of the pixels above a
    threshold sum to the mean overlap of the regions.
    """
    region_ids, num_regions = ndimage.label(masks, structure=_EIGHT_CONNECTED_PER_IMAGE)
    sizes = np.bincount(region_ids.reshape(-1), minlength=num_regions + 1).astype(np.float64)
    per_region = np.zeros(num_regions + 1)
    per_region[1:] = 1.0 / (sizes[1:] * max(num_regions, 1))
    flat_ids = region_ids.reshape(-1)
    return (lambda indices: per_region[flat_ids[indices]]), num_regions


def _pixel_counts(anomaly_maps: ArrayLike, masks: ArrayLike, fpr_limit: float | None = None) -> RankedCounts:
    """Ranked pixel counts with PRO weights; with `fpr_limit`, only as far down as the PRO curve needs.

    The curve up to an FPR of `fpr_limit` (and its first point beyond, for the interpolation) only
    involves scores >= t*, the (m + 1)-th largest defect-free score with m = floor(limit x
    defect-free pixels): found by a linear-time selection, so only that top part is sorted.
    """
    maps = _as_numpy(anomaly_maps)
    truth = _as_numpy(masks) > 0
    if maps.shape != truth.shape or maps.ndim != 3:
        raise ValueError(f"anomaly maps {maps.shape} and masks {truth.shape} must both be N x H x W")
    weights, num_regions = region_weights(truth)
    if num_regions == 0:
        raise ValueError("AUPRO needs at least one defect region in the masks, but every mask is empty")
    num_defect = int(truth.sum())
    num_normal = truth.size - num_defect
    if num_normal == 0:
        raise ValueError("AUPRO needs defect-free pixels, but every mask pixel is a defect")
    scores, flat_truth = maps.reshape(-1), truth.reshape(-1)
    needed = int(np.floor(fpr_limit * num_normal)) + 1 if fpr_limit is not None else num_normal + 1
    if needed > num_normal:
        return ranked_counts(scores, flat_truth, weights)
    normal_scores = scores[~flat_truth]
    cutoff = np.partition(normal_scores, num_normal - needed)[num_normal - needed]
    selected = np.flatnonzero(scores >= cutoff)
    return ranked_counts(
        scores[selected], flat_truth[selected], lambda indices: weights(selected[indices]), (num_defect, num_normal)
    )


def _pro_points(counts: RankedCounts) -> tuple[np.ndarray, np.ndarray]:
    fpr = np.concatenate([[0.0], counts.false_positives / counts.num_negatives])
    pro = np.concatenate([[0.0], counts.weight_sums])
    return fpr, pro


def pro_curve(anomaly_maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-region-overlap curve: (false positive rates, mean region overlaps).

    One point per distinct score, from the highest threshold down, starting at (0, 0).
    FPR counts every defect-free pixel of the set; the overlap of a threshold is the mean, over
    all connected defect regions of the set, of the fraction of the region at or above it.
    """
    return _pro_points(_pixel_counts(anomaly_maps, masks))


def _area_to_limit(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoidal area under (fpr, pro) up to `fpr_limit`, interpolated there, divided by the limit."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    fpr_part, pro_part = fpr[:inside], pro[:inside]
    if inside < len(fpr) and fpr_part[-1] < fpr_limit:
        weight = (fpr_limit - fpr[inside - 1]) / (fpr[inside] - fpr[inside - 1])
        fpr_part = np.append(fpr_part, fpr_limit)
        pro_part = np.append(pro_part, pro[inside - 1] + weight * (pro[inside] - pro[inside - 1]))
    return float(trapezoid(pro_part, fpr_part) / fpr_limit)


def aupro(anomaly_maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to `fpr_limit` (MVTec AD definition), in [0, 1].

    `anomaly_maps` and `masks` are N x H x W tensors or arrays. The curve is integrated with the
    trapezoidal rule and linearly interpolated at the limit, then divided by the limit.
    """
    return _area_to_limit(*_pro_points(_pixel_counts(anomaly_maps, masks, fpr_limit)), fpr_limit)


def compute_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    anomaly_maps: torch.Tensor | None,
    masks: torch.Tensor | None,
    fpr_limit: float = 0.3,
    image_threshold: float | None = None,
    with_f1: bool = True,
) -> dict[str, float | None]:
    """Image AUROC / F1-max / AP always; pixel AUROC / F1-max / AP / AUPRO (one sort) with masks."""
    from anomalib_lite.errors import UserInputError

    image = ranked_counts(scores, labels)
    if image.num_positives == 0:
        raise UserInputError("the test set has no anomalous images: AUROC, F1 and AUPRO need defective images")
    _check_both_classes(image, "image AUROC")
    results: dict[str, float | None] = {
        "image_auroc": image.auroc(),
        "pixel_auroc": None,
        "pixel_aupro": None,
    }
    if with_f1:
        results.update(image_f1max=image.f1_max(), image_ap=image.average_precision(), pixel_f1max=None, pixel_ap=None)
        if image_threshold is not None and image_threshold == image_threshold:  # not NaN
            results["image_f1_at_val_threshold"] = f1_at_threshold(scores, labels, image_threshold)
    if anomaly_maps is not None and masks is not None and bool(masks.any()):
        pixel = _pixel_counts(anomaly_maps, masks)
        results["pixel_auroc"] = pixel.auroc()
        results["pixel_aupro"] = _area_to_limit(*_pro_points(pixel), fpr_limit)
        if with_f1:
            results["pixel_f1max"] = pixel.f1_max()
            results["pixel_ap"] = pixel.average_precision()
    return results


def tidy(value: float | None) -> float | None:
    """A metric as reported: within [0, 1] and rounded to 6 decimals (float32 sums can land a hair
    above 1, e.g. 1.0000001192092896)."""
    return None if value is None else round(min(max(float(value), 0.0), 1.0), 6)
