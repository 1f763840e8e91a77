#!/usr/bin/env python
"""AUPRO: ours against anomalib 2.7's, in the same process on the same data, and both against the
MVTec AD definition computed threshold by threshold.

Data: N x H x W random float32 maps (seeded) and blob masks (unions of 1-3 random ellipses on half
of the images), maps raised inside the blobs so the score is not trivial. A tie-heavy variant
quantises the maps to `--levels` values, where every threshold is a large tie and the reference
(one pass per distinct threshold) is cheap enough to run on the full set.

Run it from the anomalib reference venv (see experiments/anomalib_reference.py):

    ../venv-anomalib/bin/python experiments/bench_aupro.py [--images 100 --size 256 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from scipy import ndimage

from anomalib_lite.metrics import aupro


def blob_masks(images: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((images, size, size), dtype=np.uint8)
    for index in range(images // 2):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.1, 0.9, 2) * size
            ry, rx = rng.uniform(0.02, 0.12, 2) * size
            masks[index][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    return masks


def reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """The MVTec AD definition, one pass per distinct threshold (for maps with few distinct values)."""
    regions, count = ndimage.label(masks, structure=np.pad(np.ones((1, 3, 3), bool), ((1, 1), (0, 0), (0, 0))))
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    normal = regions == 0
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        above = maps >= threshold
        overlap = np.bincount(regions[above], minlength=count + 1)[1:] / sizes[1:]
        points.append(((above & normal).sum() / normal.sum(), overlap.mean()))
    fpr, pro = np.array(points).T
    keep = fpr <= limit
    fpr_part, pro_part = np.append(fpr[keep], limit), np.append(pro[keep], np.interp(limit, fpr, pro))
    return float(np.sum(np.diff(fpr_part) * (pro_part[1:] + pro_part[:-1]) / 2) / limit)


def timed(function, repeats: int) -> tuple[float, list[float]]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        seconds.append(time.perf_counter() - start)
    return float(value), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--limit", type=float, default=0.3)
    parser.add_argument("--levels", type=int, default=64, help="distinct values of the tie-heavy variant")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from anomalib.metrics.aupro import _AUPRO  # the torchmetrics Metric behind anomalib's AUPRO

    def anomalib_aupro(maps: torch.Tensor, masks: torch.Tensor) -> float:
        metric = _AUPRO(fpr_limit=args.limit)
        metric.update(maps, masks)
        return float(metric.compute())

    masks = torch.from_numpy(blob_masks(args.images, args.size, args.seed))
    noise = torch.rand(args.images, args.size, args.size, generator=torch.Generator().manual_seed(args.seed))
    variants = {
        "continuous": noise + 0.3 * masks,
        f"tie-heavy ({args.levels} levels)": torch.floor((noise + 0.3 * masks) / 1.3 * args.levels) / args.levels,
    }
    report = {"images": args.images, "size": args.size, "fpr_limit": args.limit, "torch_threads": torch.get_num_threads()}
    for name, maps in variants.items():
        ours, ours_seconds = timed(lambda: aupro(maps, masks, fpr_limit=args.limit), args.repeats)  # noqa: B023
        theirs, their_seconds = timed(lambda: anomalib_aupro(maps, masks), args.repeats)  # noqa: B023
        row = {
            "ours": ours, "anomalib": theirs,
            "ours_seconds": [round(s, 3) for s in ours_seconds], "anomalib_seconds": [round(s, 3) for s in their_seconds],
            "speedup_of_medians": round(statistics.median(their_seconds) / statistics.median(ours_seconds), 2),
        }
        if name.startswith("tie-heavy"):
            reference = reference_aupro(maps.numpy(), masks.numpy(), args.limit)
            row |= {"mvtec_definition": reference, "ours_minus_definition": ours - reference,
                    "anomalib_minus_definition": theirs - reference}
        report[name] = row
        print(f"{name}: ours {ours:.8f} in {statistics.median(ours_seconds):.3f} s (median of {args.repeats}), "
              f"anomalib {theirs:.8f} in {statistics.median(their_seconds):.3f} s: {row['speedup_of_medians']}x"
              + (f"; MVTec definition {row['mvtec_definition']:.8f}" if "mvtec_definition" in row else ""), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
