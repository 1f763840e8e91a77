#!/usr/bin/env python
"""Coreset benchmark: greedy_coreset on a random 100,000 x 1,024 bank picking 10,000 points.

Reports the wall time and compares the coverage radius (max distance from any bank point to its
nearest picked point, in the shared random projection) with an independent textbook greedy
k-center loop (float64 numpy, no pruning) started from the same point.

    python experiments/bench_coreset.py [--points 100000] [--dim 1024] [--k 10000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from anomalib_lite.models.components import coverage_radius, greedy_coreset, random_projection


def textbook_greedy(points: np.ndarray, k: int, start: int) -> np.ndarray:
    squared_norms = np.einsum("ij,ij->i", points, points)
    min_d = np.full(len(points), np.inf)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = start
    for step in range(1, k):
        center = points[chosen[step - 1]]
        min_d = np.minimum(min_d, squared_norms - 2 * points @ center + center @ center)
        min_d[chosen[:step]] = -np.inf
        chosen[step] = int(np.argmax(min_d))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=10_000)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    bank = torch.randn(args.points, args.dim, generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    picked = greedy_coreset(bank, args.k, projection_dim=args.projection_dim, seed=args.seed, progress=True)
    ours_seconds = time.perf_counter() - start
    projected = random_projection(bank, args.projection_dim, seed=args.seed)
    start = time.perf_counter()
    reference = textbook_greedy(projected.double().numpy(), args.k, start=int(picked[0]))
    reference_seconds = time.perf_counter() - start
    ours = coverage_radius(projected, projected[picked])
    theirs = coverage_radius(projected, projected[torch.from_numpy(reference)])
    print(f"bank {args.points} x {args.dim}, k={args.k}, projection {args.projection_dim}, torch threads {torch.get_num_threads()}")
    print(f"greedy_coreset:            {ours_seconds:8.1f} s   coverage radius {ours:.4f}")
    print(f"textbook greedy (float64): {reference_seconds:8.1f} s   coverage radius {theirs:.4f}")
    print(f"radius ratio {ours / theirs:.5f} (|1 - ratio| = {abs(1 - ours / theirs) * 100:.3f} %), "
          f"same picks: {int(np.sum(picked.numpy() == reference))}/{args.k}")


if __name__ == "__main__":
    main()
