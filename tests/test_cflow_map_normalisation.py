"""experiments/cflow_map_normalisation.py: anomalib's per-batch rule on hand-made likelihoods."""

from __future__ import annotations

import importlib.util

import torch
from conftest import REPO

spec = importlib.util.spec_from_file_location("normalisation", REPO / "experiments" / "cflow_map_normalisation.py")
normalisation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(normalisation)


def _log_likelihoods(images: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [-torch.rand(images, 1, size, size, generator=generator) * 3 for size in (4, 2)]


def test_one_batch_is_the_test_set_maximum_rule() -> None:
    log_likelihoods = _log_likelihoods()
    one_batch = torch.zeros(6, dtype=torch.long)
    per_batch = normalisation.per_batch_maps(log_likelihoods, one_batch, size=8)
    whole = normalisation.summed_probability(log_likelihoods, [ll.max() for ll in log_likelihoods], size=8)
    torch.testing.assert_close(per_batch, whole.max() - whole)


def test_per_batch_rule_makes_a_score_depend_on_its_batch_mates() -> None:
    # Constant per-image log-likelihoods on two levels: image 0 at -2, image 1 at -1, image 2 at -3.
    values = torch.tensor([-2.0, -1.0, -3.0]).reshape(3, 1, 1, 1)
    log_likelihoods = [values.expand(3, 1, 4, 4), values.expand(3, 1, 2, 2)]
    beside_better = normalisation.per_batch_maps(log_likelihoods, torch.tensor([0, 0, 1]), size=4)
    beside_worse = normalisation.per_batch_maps(log_likelihoods, torch.tensor([0, 1, 0]), size=4)
    # Beside image 1 the batch maximum is -1: image 0 sums 2 exp(-1) against the batch's 2.
    torch.testing.assert_close(beside_better[0], torch.full((4, 4), 2 - 2 * torch.e**-1))
    # Beside image 2 image 0 is the batch maximum itself: its map is 0.
    torch.testing.assert_close(beside_worse[0], torch.zeros(4, 4))
