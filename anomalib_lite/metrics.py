"""Anomaly-detection metrics: AUROC, F1-max and the MVTec AD per-region overlap (AUPRO).

AUROC and the precision-recall curve come from torchmetrics (exact, no binning). AUPRO has no
library implementation, so it is written here, exactly and in O(pixels) memory:
one sort of all pixel scores, then cumulative sums of per-pixel weights.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from scipy.integrate import trapezoid
from torchmetrics.functional.classification import binary_auroc, binary_precision_recall_curve

ArrayLike = torch.Tensor | np.ndarray

# 8-connectivity, as in the MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_tensor(values: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    tensor = torch.as_tensor(values).detach().cpu()
    return tensor.to(dtype) if dtype is not None else tensor


def _unit_interval(scores: torch.Tensor) -> torch.Tensor:
    """Affine map onto [0, 1] in float64: same ranking, and torchmetrics then leaves the scores
    alone (it applies a sigmoid to anything outside [0, 1], which saturates large scores)."""
    scores = scores.double()
    low, high = scores.min(), scores.max()
    return (scores - low) / (high - low) if high > low else torch.zeros_like(scores)


def _check_both_classes(labels: torch.Tensor, what: str) -> None:
    positives = int(labels.sum())
    if positives == 0 or positives == labels.numel():
        kind = "anomalous" if positives == 0 else "normal"
        raise ValueError(f"{what} needs both normal and anomalous samples, but there are no {kind} ones")


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of `scores` (higher = more anomalous) against binary `labels`."""
    scores_t = _unit_interval(_as_tensor(scores).flatten())
    labels_t = _as_tensor(labels).flatten().to(torch.long)
    _check_both_classes(labels_t, "AUROC")
    return float(binary_auroc(scores_t, labels_t, thresholds=None))


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Best F1 score over all thresholds (the threshold-free F1 reported in the literature)."""
    scores_t = _unit_interval(_as_tensor(scores).flatten())
    labels_t = _as_tensor(labels).flatten().to(torch.long)
    _check_both_classes(labels_t, "F1-max")
    precision, recall, _ = binary_precision_recall_curve(scores_t, labels_t, thresholds=None)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    return float(f1.max())


def f1_at_threshold(scores: ArrayLike, labels: ArrayLike, threshold: float) -> float:
    """F1 of the decision `score >= threshold` (e.g. a threshold fitted on validation data)."""
    predicted = _as_tensor(scores, torch.float32).flatten() >= threshold
    actual = _as_tensor(labels).flatten().bool()
    true_pos = (predicted & actual).sum().item()
    denominator = predicted.sum().item() + actual.sum().item()
    return 2 * true_pos / denominator if denominator else 0.0


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label the connected defect regions of every mask with ids unique over the whole set.

    Returns (region id per pixel, 0 = defect-free; pixel count per region id, index 0 unused).
    """
    region_ids = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        region_ids[i] = np.where(labelled > 0, labelled + offset, 0)
        offset += count
    region_sizes = np.bincount(region_ids.ravel(), minlength=offset + 1)
    return region_ids, region_sizes


def pro_curve(anomaly_maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The exact per-region-overlap curve: (false positive rates, mean region overlaps).

    One point per distinct score, from the highest threshold down, starting at (0, 0).
    FPR counts every defect-free pixel of the set; the overlap of a threshold is the mean, over
    all connected defect regions of the set, of the fraction of the region at or above it.
    """
    maps = np.asarray(_as_tensor(anomaly_maps, torch.float64).numpy())
    gt = np.asarray(_as_tensor(masks).numpy()) > 0
    if maps.shape != gt.shape or maps.ndim != 3:
        raise ValueError(f"anomaly maps {maps.shape} and masks {gt.shape} must both be N x H x W")
    region_ids, region_sizes = _label_regions(gt)
    num_regions = len(region_sizes) - 1
    num_normal = int((~gt).sum())
    if num_regions == 0:
        raise ValueError("AUPRO needs at least one defect region in the masks, but every mask is empty")
    if num_normal == 0:
        raise ValueError("AUPRO needs defect-free pixels, but every mask pixel is a defect")

    # Each pixel moves one curve coordinate when the threshold passes it: a defect-free pixel adds
    # 1/num_normal to the FPR, a defect pixel adds 1/(|its region| * num_regions) to the overlap.
    ids = region_ids.ravel()
    fpr_step = np.where(ids == 0, 1.0 / num_normal, 0.0)
    pro_step = np.where(ids > 0, 1.0 / (region_sizes[ids] * num_regions), 0.0)
    del ids
    order = np.argsort(-maps.ravel(), kind="stable")
    sorted_scores = maps.ravel()[order]
    fpr = np.cumsum(fpr_step[order])
    pro = np.cumsum(pro_step[order])
    del fpr_step, pro_step, order
    # Pixels with the same score cross the threshold together: keep the last point of each tie.
    last_of_tie = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fpr = np.concatenate([[0.0], fpr[last_of_tie]])
    pro = np.concatenate([[0.0], pro[last_of_tie]])
    return fpr, pro


def aupro(anomaly_maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to `fpr_limit` (MVTec AD definition), in [0, 1].

    `anomaly_maps` and `masks` are N x H x W tensors or arrays. The curve is integrated with the
    trapezoidal rule and linearly interpolated at the limit, then divided by the limit.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(anomaly_maps, masks)
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    fpr_part, pro_part = fpr[:inside], pro[:inside]
    if inside < len(fpr) and fpr_part[-1] < fpr_limit:
        weight = (fpr_limit - fpr[inside - 1]) / (fpr[inside] - fpr[inside - 1])
        pro_at_limit = pro[inside - 1] + weight * (pro[inside] - pro[inside - 1])
        fpr_part = np.append(fpr_part, fpr_limit)
        pro_part = np.append(pro_part, pro_at_limit)
    return float(trapezoid(pro_part, fpr_part) / fpr_limit)
