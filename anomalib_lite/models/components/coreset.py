"""Greedy k-center coreset selection (Sener & Savarese 2018; PatchCore, Roth et al. 2022)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def random_projection(features: torch.Tensor, projection_dim: int, seed: int = 0) -> torch.Tensor:
    """Johnson-Lindenstrauss projection with a seeded Gaussian matrix (identity if already small)."""
    if projection_dim <= 0 or features.shape[1] <= projection_dim:
        return features.float()
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(features.shape[1], projection_dim, generator=generator) / projection_dim**0.5
    return features.float() @ matrix.to(features.device)


@torch.no_grad()
def greedy_coreset(
    features: torch.Tensor,
    k: int,
    projection_dim: int = 128,
    seed: int = 0,
    *,
    progress: bool = False,
    dense_fraction: float = 0.25,
) -> torch.Tensor:
    """Indices of `k` rows of `features` (N x D) picked by exact greedy k-center.

    Each step adds the point farthest from everything picked so far, in a seeded random
    projection of the features (Sener & Savarese; PatchCore's approximate-greedy projection).

    The loop runs on the features' device with every N-sized buffer allocated once. Per step it
    makes one matrix-vector pass, restricted by the triangle inequality to the points the new
    centre can move: a point x whose nearest centre is c_j (at distance r(x)) cannot get closer
    to a new centre c when |c - c_j| >= 2 r(x). Clusters are skipped whole, using their radius
    max r(x). The result is the same greedy sequence as the unrestricted loop; as the coverage
    radius shrinks, most of the bank is skipped (the bank does not fit in the CPU cache, so
    this is what makes large banks fast). While more than `dense_fraction` of the points are in
    reach, a plain pass over all of them is cheaper than gathering them, and is used instead.
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
    cluster_radius = torch.zeros(k, device=device)
    selected = torch.empty(k, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(seed)
    current = torch.randint(num_points, (1,), generator=generator).to(device)

    min_distances = torch.full((num_points,), float("inf"), device=device)
    assignment = torch.zeros(num_points, dtype=torch.long, device=device)
    all_points = torch.arange(num_points, device=device)
    report_every = max(1, k // 100)
    bar = tqdm(total=k, desc="coreset", unit="pt", disable=not progress, mininterval=1.0)
    for step in range(k):
        selected[step] = current[0]
        center = points.index_select(0, current).squeeze(0)
        centers[step] = center
        center_norms[step] = squared_norms[current[0]]
        if step == 0:
            reachable = None
        else:
            to_centers = (center_norms[:step] - 2.0 * (centers[:step] @ center) + center_norms[step]).clamp_min(0).sqrt()
            # Small slack: float rounding must never skip a point the new centre really moves.
            reachable = to_centers < 2.0 * cluster_radius[:step] * (1 + 1e-4) + 1e-6
            candidate_mask = reachable.index_select(0, assignment)
            if int(candidate_mask.sum()) > num_points * dense_fraction:
                reachable = None  # most points are in reach: one plain pass beats gathering them
        if reachable is None:
            candidates = all_points
            distances = torch.addmv(squared_norms, points, center, alpha=-2.0).add_(center_norms[step])
            moved = distances < min_distances
            torch.minimum(min_distances, distances, out=min_distances)
            assignment.masked_fill_(moved, step)
            cluster_radius[:step].zero_()
        else:
            candidates = candidate_mask.nonzero().squeeze(1)
            distances = torch.addmv(
                squared_norms.index_select(0, candidates), points.index_select(0, candidates), center, alpha=-2.0
            ).add_(center_norms[step])
            previous = min_distances.index_select(0, candidates)
            moved = distances < previous
            min_distances.index_copy_(0, candidates, torch.where(moved, distances, previous))
            assignment.index_copy_(0, candidates, torch.where(moved, step, assignment.index_select(0, candidates)))
            # Every member of a reachable cluster is a candidate, so their radii are recomputed exactly.
            cluster_radius[:step].masked_fill_(reachable, 0.0)
        # A picked point is never picked again, even among exact duplicates.
        min_distances.index_fill_(0, current, float("-inf"))
        candidate_radius = min_distances.index_select(0, candidates).clamp_min(0).sqrt()
        cluster_radius.scatter_reduce_(0, assignment.index_select(0, candidates), candidate_radius, reduce="amax")
        current = torch.argmax(min_distances).view(1)
        if (step + 1) % report_every == 0 or step + 1 == k:
            bar.update(step + 1 - bar.n)
    bar.close()
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
