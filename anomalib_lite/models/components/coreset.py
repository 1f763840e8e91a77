"""Greedy k-center coreset selection (Sener & Savarese 2018; PatchCore, Roth et al. 2022)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Annotated

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from anomalib_lite.schema import PositiveInt, Range, check_arguments

log = logging.getLogger(__name__)


def random_projection(features: torch.Tensor, projection_dim: int | None, seed: int = 0) -> torch.Tensor:
    """Johnson-Lindenstrauss projection with a seeded Gaussian matrix (identity if already small or None)."""
    if projection_dim is None or projection_dim <= 0 or features.shape[1] <= projection_dim:
        return features.float()
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], projection_dim, generator=generator) / projection_dim**0.5
    return features.float() @ matrix.to(features.device)


@torch.no_grad()
def greedy_coreset(
    features: torch.Tensor,
    k: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    *,
    progress: bool = False,
    dense_fraction: float = 0.25,
    return_radius: bool = False,
    line_interval: float = 30.0,
) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Indices of `k` rows of `features` (N x D) picked by exact greedy k-center.

    `return_radius`: also return the coverage radius of the picks in the projection (the largest
    distance from a point to its nearest pick), which the loop knows at its end for free.
    `progress`: a bar on a terminal; elsewhere (logs, CI, SLURM files) a line every `line_interval`
    seconds, as the framework's progress callback writes for its own passes.

    Each step adds the point farthest from everything picked so far, in a seeded random
    projection of the features (Sener & Savarese; PatchCore's approximate-greedy projection),
    or in the features themselves when `projection_dim` is None or not below their dimension.

    The loop runs on the features' device with every N-sized buffer allocated once. Per step it
    makes one matrix-vector pass, restricted by the triangle inequality to the points the new
    centre can move: a point x at distance r(x) from its nearest centre c_j cannot get closer to
    a new centre c when |c - c_j| >= 2 r(x). Deciding that costs one N-vector gather and compare
    against the distances from c to the centres picked so far (cheap next to the bank itself,
    which does not fit in the CPU cache), and gives the same greedy sequence as the unrestricted
    loop. While more than `dense_fraction` of the points are in reach (the first steps), a plain
    pass over all of them is cheaper than gathering them, and is used instead.

    The package's one function over 80 lines, on purpose: a hot loop whose preallocated buffers
    every step shares, kept in one piece so it reads as the algorithm it is.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be N x D, got shape {tuple(features.shape)}")
    num_points = features.shape[0]
    if not 0 < k <= num_points:
        raise ValueError(f"k must be in [1, {num_points}], got {k}")
    points = random_projection(features, projection_dim, seed).contiguous()
    device = points.device
    squared_norms = (points * points).sum(dim=1)
    centers = torch.empty(k, points.shape[1], device=device)
    center_norms = torch.empty(k, device=device)
    selected = torch.empty(k, dtype=torch.long, device=device)
    min_distances = torch.full((num_points,), float("inf"), device=device)  # squared, to the nearest centre
    assignment = torch.zeros(num_points, dtype=torch.long, device=device)  # index of that centre
    distances = torch.empty(num_points, device=device)
    # Scratch for the reach test, also allocated once: gathered centre distances, bounds, mask.
    reach_lhs = torch.empty(num_points, device=device)
    reach_rhs = torch.empty(num_points, device=device)
    mask = torch.empty(num_points, dtype=torch.bool, device=device)
    generator = torch.Generator().manual_seed(seed)
    current = torch.randint(num_points, (1,), generator=generator).to(device)

    # The expansion |x|^2 - 2 x.c + |c|^2 loses ~eps * |x|^2 to rounding: the reach test gets that much
    # slack (and more), so rounding can only make it keep a point, never skip one that moves.
    slack = 1e-5 * float(squared_norms.max())
    report_every = max(1, k // 100)
    lines = progress and not sys.stdout.isatty()
    bar = tqdm(total=k, desc="coreset", unit="pt", disable=not progress or lines, mininterval=1.0, file=sys.stdout)
    start = last_line = time.perf_counter()
    # While the loop is dense, the reach test is repeated only every `dense_streak` steps (doubling):
    # a plain pass is always exact, so testing less often only saves the test's own cost.
    next_reach_test, dense_streak = 1, 1
    for step in range(k):
        selected[step] = current[0]
        center = points.index_select(0, current).squeeze(0)
        centers[step] = center
        center_norms[step] = squared_norms[current[0]]
        candidates = None
        if step >= next_reach_test:
            # Squared distances from the new centre to every earlier one; x is in reach iff
            # |c - c_a(x)|^2 < 4 r(x)^2.
            to_centers = center_norms[:step] - 2.0 * (centers[:step] @ center) + center_norms[step]
            torch.index_select(to_centers, 0, assignment, out=reach_lhs)
            torch.mul(min_distances, 4.0, out=reach_rhs).add_(slack)
            torch.lt(reach_lhs, reach_rhs, out=mask)
            candidates = mask.nonzero().squeeze(1)
            if candidates.numel() > num_points * dense_fraction:
                candidates = None
                next_reach_test, dense_streak = step + dense_streak, min(2 * dense_streak, 64)
            else:
                next_reach_test, dense_streak = step + 1, 1
        if candidates is None:
            torch.addmv(squared_norms, points, center, alpha=-2.0, out=distances)
            distances.add_(center_norms[step])
            torch.lt(distances, min_distances, out=mask)
            assignment.masked_fill_(mask, step)
            torch.minimum(min_distances, distances, out=min_distances)
        elif candidates.numel() > 0:
            candidate_distances = torch.addmv(
                squared_norms.index_select(0, candidates), points.index_select(0, candidates), center, alpha=-2.0
            ).add_(center_norms[step])
            previous = min_distances.index_select(0, candidates)
            moved = candidate_distances < previous
            min_distances.index_copy_(0, candidates, torch.where(moved, candidate_distances, previous))
            assignment.index_copy_(0, candidates, torch.where(moved, step, assignment.index_select(0, candidates)))
        # A picked point is never picked again, even among exact duplicates.
        min_distances.index_fill_(0, current, float("-inf"))
        current = torch.argmax(min_distances).view(1)
        if (step + 1) % report_every == 0 or step + 1 == k:
            bar.update(step + 1 - bar.n)
            if lines and step + 1 < k and time.perf_counter() - last_line >= line_interval:
                last_line = time.perf_counter()
                log.info("coreset: %d/%d points, %.0f s", step + 1, k, last_line - start)
    bar.close()
    if return_radius:
        # After the last step every point's distance to its nearest pick is known (picks hold -inf).
        radius = float(min_distances.max().clamp_min(0).sqrt()) if k < num_points else 0.0
        return selected, radius
    return selected


def coverage_radius(
    features: torch.Tensor, centers: torch.Tensor, chunk_size: int = 16384
) -> float:
    """Largest distance from any row of `features` to its nearest row of `centers` (chunked)."""
    radius = 0.0
    for start in range(0, features.shape[0], chunk_size):
        chunk = features[start : start + chunk_size].float()
        radius = max(radius, float(torch.cdist(chunk, centers.float()).min(dim=1).values.max()))
    return radius


class GreedyCoresetSampler:
    """Keeps `ratio` of a memory bank's rows by greedy k-center selection (`greedy_coreset`).

    A sampler object is handed to the method that owns the bank (PatchCore), as in the PatchCore
    authors' code: `sampler(features)` returns the indices of the rows to keep. `ratio=1` keeps
    every row (no selection). Under DDP every rank holds the same gathered bank: rank 0 selects
    and broadcasts the indices, so every rank keeps the rows a single process would.

    After a call, `report` says what the selection found: the rows kept, its seconds and the
    coverage radius in the projection it selected in (free); `report_coverage=True` adds the
    radius in the full feature space (one more pass over the bank against the picks: minutes on
    large banks), the number that tells whether the projection picked worse centres.
    """

    def __init__(
        self, ratio: Annotated[float, Range(0, 1, low_open=True)] = 0.1, projection_dim: PositiveInt | None = 128, seed: int = 0,
        progress: bool = True, report_coverage: bool = False,
    ) -> None:
        # The declared bounds, also when the sampler is built in Python rather than from a config.
        check_arguments(GreedyCoresetSampler, {"ratio": ratio, "projection_dim": projection_dim}, "coreset_sampler")
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.seed = seed
        self.progress = progress
        self.report_coverage = report_coverage
        self.report: dict[str, float | int] = {}

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.ratio >= 1:
            return torch.arange(features.shape[0], device=features.device)
        k = max(1, round(features.shape[0] * self.ratio))
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and dist.get_rank() != 0:
            indices = torch.empty(k, dtype=torch.long, device=features.device)
        else:
            start = time.perf_counter()
            indices, projected_radius = greedy_coreset(
                features, k, projection_dim=self.projection_dim, seed=self.seed, progress=self.progress, return_radius=True
            )
            seconds = time.perf_counter() - start
            projected = (self.projection_dim or features.shape[1]) < features.shape[1]
            # Selected in the features themselves, the loop's radius is the full-space one: no second pass.
            self.report = {
                "coreset_kept": k, "coreset_of": features.shape[0], "coreset_seconds": round(seconds, 2),
                "coreset_radius_projected" if projected else "coreset_radius": projected_radius,
            }
            log.info("coreset: kept %d of %d patches in %.1f s, coverage radius %.4g in the %s", k, features.shape[0],
                     seconds, projected_radius,
                     f"{self.projection_dim}-dim projection" if projected else f"{features.shape[1]}-dim feature space")
            if self.report_coverage and projected:
                start = time.perf_counter()
                self.report["coreset_radius"] = coverage_radius(features, features[indices])
                log.info("coreset: coverage radius %.4g in the %d-dim feature space (%.1f s)",
                         self.report["coreset_radius"], features.shape[1], time.perf_counter() - start)
        if distributed:
            dist.broadcast(indices, src=0)
        return indices
