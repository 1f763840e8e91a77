"""Greedy k-center coreset and chunked nearest-neighbour search against plain references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalib_lite.models.components import (
    GreedyCoresetSampler,
    coverage_radius,
    greedy_coreset,
    nearest_neighbors,
    random_projection,
)


def _reference_greedy(points: np.ndarray, k: int, start: int) -> list[int]:
    """Textbook greedy k-center in float64, one distance row per step."""
    min_d = np.full(len(points), np.inf)
    chosen = [start]
    for _ in range(k - 1):
        min_d = np.minimum(min_d, np.linalg.norm(points - points[chosen[-1]], axis=1))
        min_d[chosen] = -np.inf
        chosen.append(int(np.argmax(min_d)))
    return chosen


@pytest.mark.parametrize(("dim", "projection_dim"), [(16, 128), (300, 32)])
def test_greedy_coreset_is_exact_greedy(dim: int, projection_dim: int) -> None:
    features = torch.randn(600, dim, generator=torch.Generator().manual_seed(0))
    picked = greedy_coreset(features, 60, projection_dim=projection_dim, seed=3)
    projected = random_projection(features, projection_dim, seed=3).double().numpy()
    reference = _reference_greedy(projected, 60, start=int(picked[0]))
    assert picked.tolist() == reference
    assert picked.dtype == torch.long and len(set(picked.tolist())) == 60


def test_triangle_inequality_pruning_changes_nothing_on_clustered_data() -> None:
    # Tight blobs: most clusters are out of the new centre's reach, so the pruning really skips.
    generator = torch.Generator().manual_seed(5)
    blobs = torch.randn(40, 24, generator=generator) * 10
    features = blobs.repeat_interleave(50, dim=0) + 0.3 * torch.randn(2000, 24, generator=generator)
    pruned = greedy_coreset(features, 300, seed=7, dense_fraction=0.0)
    unpruned = greedy_coreset(features, 300, seed=7, dense_fraction=2.0)
    assert torch.equal(pruned, unpruned)
    # Same coverage as the float64 textbook loop (float32 rounding may swap near-tied picks).
    reference = _reference_greedy(features.double().numpy(), 300, start=int(pruned[0]))
    ours, theirs = coverage_radius(features, features[pruned]), coverage_radius(features, features[reference])
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_greedy_coreset_is_seeded_and_covers_better_than_random() -> None:
    features = torch.randn(2000, 64, generator=torch.Generator().manual_seed(1))
    first, again = greedy_coreset(features, 100, seed=0), greedy_coreset(features, 100, seed=0)
    assert torch.equal(first, again)
    assert not torch.equal(first, greedy_coreset(features, 100, seed=1))
    random_pick = torch.randperm(2000, generator=torch.Generator().manual_seed(0))[:100]
    assert coverage_radius(features, features[first]) < coverage_radius(features, features[random_pick])


@pytest.mark.parametrize(("dim", "projection_dim"), [(16, 128), (300, 32)])
def test_greedy_coreset_radius_is_the_coverage_radius_of_its_picks(dim: int, projection_dim: int) -> None:
    features = torch.randn(800, dim, generator=torch.Generator().manual_seed(4))
    picked, radius = greedy_coreset(features, 40, projection_dim=projection_dim, seed=2, return_radius=True)
    assert torch.equal(picked, greedy_coreset(features, 40, projection_dim=projection_dim, seed=2))
    projected = random_projection(features, projection_dim, seed=2)
    assert radius == pytest.approx(coverage_radius(projected, projected[picked]), rel=1e-4)
    assert greedy_coreset(features, 800, return_radius=True)[1] == 0.0  # every point picked
    # No projection: the radius is the one in the features themselves.
    picked, radius = greedy_coreset(features, 40, projection_dim=None, return_radius=True)
    assert radius == pytest.approx(coverage_radius(features, features[picked]), rel=1e-4)


def test_sampler_reports_its_coverage_in_the_projection_and_the_feature_space() -> None:
    features = torch.randn(500, 200, generator=torch.Generator().manual_seed(6))
    sampler = GreedyCoresetSampler(ratio=0.05, projection_dim=16, progress=False)
    picked = sampler(features)
    assert set(sampler.report) == {"coreset_kept", "coreset_of", "coreset_seconds", "coreset_radius_projected"}
    assert (sampler.report["coreset_kept"], sampler.report["coreset_of"]) == (25, 500)
    projected = random_projection(features, 16, seed=0)
    assert sampler.report["coreset_radius_projected"] == pytest.approx(coverage_radius(projected, projected[picked]), rel=1e-4)
    sampler = GreedyCoresetSampler(ratio=0.05, projection_dim=16, progress=False, report_coverage=True)
    picked = sampler(features)
    full = coverage_radius(features, features[picked])
    assert sampler.report["coreset_radius"] == pytest.approx(full)
    # A 16-dim Gaussian projection of 200-dim points shrinks distances by ~sqrt(16/200) on average.
    assert sampler.report["coreset_radius_projected"] < full
    # Selected in the features themselves, the one radius is the full-space one, under its name.
    sampler = GreedyCoresetSampler(ratio=0.05, projection_dim=None, progress=False, report_coverage=True)
    picked = sampler(features)
    assert "coreset_radius_projected" not in sampler.report
    assert sampler.report["coreset_radius"] == pytest.approx(coverage_radius(features, features[picked]), rel=1e-4)


def test_greedy_coreset_handles_duplicates_and_bad_k() -> None:
    features = torch.zeros(10, 4)
    features[0] = 1.0
    picked = greedy_coreset(features, 5)
    assert len(set(picked.tolist())) == 5  # all-equal rows still give distinct indices
    with pytest.raises(ValueError, match="k must be"):
        greedy_coreset(features, 11)
    with pytest.raises(ValueError, match="N x D"):
        greedy_coreset(torch.zeros(10), 2)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_nearest_neighbors_matches_full_cdist(k: int, chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(2)
    queries, bank = torch.randn(50, 8, generator=generator), torch.randn(123, 8, generator=generator)
    distances, indices = nearest_neighbors(queries, bank, k=k, chunk_size=chunk_size)
    expected_d, expected_i = torch.cdist(queries, bank).topk(k, dim=1, largest=False)
    torch.testing.assert_close(distances, expected_d, atol=1e-5, rtol=1e-5)
    assert torch.equal(indices, expected_i)


def test_greedy_coreset_writes_timed_lines_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    features = torch.randn(600, 8, generator=torch.Generator().manual_seed(1))
    with caplog.at_level("INFO", logger="anomalib_lite.models.components.coreset"):
        quiet = greedy_coreset(features, 300, projection_dim=None)
        assert not caplog.records  # no progress asked for
        loud = greedy_coreset(features, 300, projection_dim=None, progress=True, line_interval=0.0)
    lines = [record.getMessage() for record in caplog.records]
    assert torch.equal(quiet, loud)
    assert len(lines) == 299 // 3  # a line per reported step (every k // 100), none for the last
    assert lines[0].startswith("coreset: 3/300 points,") and lines[-1].startswith("coreset: 297/300 points,")
