"""NBS's pieces: the loss-profile FIFO and its padding, the class-balanced loss, the sampler's draw
and crops, the kept snapshots scoring as the states they were taken from, the reset of the
autoencoder between episodes; and a run that learns from labelled anomalies."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DATA, compose_config

from anomalib_lite.engine.checkpoint import load_model
from anomalib_lite.errors import UserInputError
from anomalib_lite.models.nbs.lightning_model import Nbs
from anomalib_lite.models.nbs.torch_model import (
    LOSS_FLOOR,
    NbsModel,
    balanced_bce,
    cell_crops,
    draw_cells,
    log_profile,
    squared_error_map,
)
from anomalib_lite.train import run


def test_log_profile_keeps_the_newest_maps_and_pads_with_the_oldest() -> None:
    maps = [torch.full((1, 2, 2), float(value)) for value in (1, 2, 3, 4)]
    profile = log_profile(maps, history=3)
    assert profile.shape == (1, 3, 2, 2)
    torch.testing.assert_close(profile[0, :, 0, 0], torch.tensor([2.0, 3.0, 4.0]).log())
    padded = log_profile(maps[:2], history=4)
    torch.testing.assert_close(padded[0, :, 1, 1], torch.tensor([1.0, 1.0, 1.0, 2.0]).log())
    # A perfectly reconstructed pixel stays finite.
    assert float(log_profile([torch.zeros(1, 2, 2)], history=1).min()) == pytest.approx(torch.tensor(LOSS_FLOOR).log().item())
    with pytest.raises(ValueError):
        log_profile([], history=2)


def test_balanced_bce_averages_the_two_classes_separately() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.5, -3.0]]])
    masks = torch.tensor([[[1, 0], [0, 0]]])
    per_pixel = F.binary_cross_entropy_with_logits(logits, masks.float(), reduction="none")[0]
    expected = (per_pixel[0, 0] + (per_pixel[0, 1] + per_pixel[1, 0] + per_pixel[1, 1]) / 3) / 2
    torch.testing.assert_close(balanced_bce(logits, masks), expected)
    # Without anomalous pixels: the normal pixels' mean.
    torch.testing.assert_close(balanced_bce(logits, torch.zeros_like(masks)), F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits)))


def test_draw_cells_decomposes_the_flat_index_and_never_draws_an_excluded_image() -> None:
    torch.manual_seed(0)
    logits = torch.full((3, 2, 4), -10.0)
    logits[1, 1, 3] = 10.0  # nearly all the mass on image 1, row 1, column 3
    cells, _ = draw_cells(logits, 5)
    assert cells.tolist() == [[1, 1, 3]] * 5
    # The log-probability's gradient (REINFORCE): counts drawn minus count x softmax.
    uniform = torch.zeros(3, 2, 4, requires_grad=True)
    cells, log_prob = draw_cells(uniform, 6)
    log_prob.backward()
    counts = torch.zeros(3, 2, 4)
    for b, row, column in cells.tolist():
        counts[b, row, column] += 1
    torch.testing.assert_close(uniform.grad, counts - 6 / 24)
    excluded = torch.tensor([False, True, False])
    cells, _ = draw_cells(logits * 0, 200, excluded)
    assert set(cells[:, 0].tolist()) <= {0, 2} and len(set(map(tuple, cells.tolist()))) > 4
    assert cells[:, 1].max() < 2 and cells[:, 2].max() < 4
    with pytest.raises(ValueError, match="excluded"):
        draw_cells(logits, 1, torch.ones(3, dtype=torch.bool))


def test_cell_crops_centre_the_window_in_its_cell_and_keep_it_inside() -> None:
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    cells = torch.tensor([[0, 1, 2], [1, 0, 0], [1, 3, 3]])
    patches = cell_crops(images, cells, grid=4, patch_size=4, jitter=torch.zeros(3, 2))
    assert patches.shape == (3, 3, 4, 4)
    # Cell (1, 2) of a 4 x 4 grid on 16 px: centre (6, 10), window rows 4-7, columns 8-11.
    torch.testing.assert_close(patches[0], images[0, :, 4:8, 8:12])
    # Corner cells: the window is clamped into the image.
    torch.testing.assert_close(patches[1], images[1, :, 0:4, 0:4])
    torch.testing.assert_close(patches[2], images[1, :, 12:16, 12:16])
    with pytest.raises(UserInputError, match="patch_size"):
        cell_crops(images, cells, grid=4, patch_size=32, jitter=torch.zeros(3, 2))


def test_snapshots_score_as_the_kept_states_and_the_reset_draws_new_weights() -> None:
    torch.manual_seed(0)
    model = NbsModel(patch_size=16, latent_channels=4, width=4, depth=2, history=3, grid=2, predictor_width=4, sampler_width=4)
    images = torch.rand(2, 3, 16, 16)
    states, expected = [], []
    for _ in range(2):
        model.reset_autoencoder()
        model.autoencoder.eval()
        states.append({k: v.clone() for k, v in model.autoencoder.state_dict().items()})
        expected.append(squared_error_map(model.autoencoder, images))
    assert not torch.equal(expected[0], expected[1]), "reset_autoencoder drew the same weights"
    model.keep_snapshots(states)
    with torch.no_grad():
        profile = model.profile(images)
    torch.testing.assert_close(profile, log_profile([expected[0], expected[0], expected[1]], 3), rtol=1e-5, atol=1e-6)
    # BatchNorm statistics start again too.
    model.autoencoder.train()
    model.autoencoder(torch.rand(4, 3, 16, 16) * 5)
    model.reset_autoencoder()
    norms = [m for m in model.autoencoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(float(m.running_mean.abs().max()) == 0 and int(m.num_batches_tracked) == 0 for m in norms)
    with pytest.raises(UserInputError, match="divisible"):
        model.profile(torch.rand(1, 3, 18, 18))


def test_bad_settings_are_reported() -> None:
    with pytest.raises(UserInputError, match="divisible"):
        NbsModel(patch_size=60, depth=3)
    optimizers = {name: {"_target_": "torch.optim.Adam"} for name in ("autoencoder", "predictor", "sampler")}
    with pytest.raises(UserInputError, match="episode_steps"):
        Nbs(episode_steps=0, epochs=1, optimizers=optimizers)


def test_a_run_learns_from_labelled_anomalies(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Given labelled anomalies NBS uses them (not synthetic stand-ins), finishes episodes (the
    kept snapshots are consecutive, different autoencoder states) and reports how many it had."""
    cfg = compose_config([
        *TINY_DATA, f"paths.output_dir={tmp_path}", "method=nbs", "dataset.image_size=64", "dataset.batch_size=4",
        "dataset.num_labelled_anomalies=3", "method.patch_size=32", "method.history=3", "method.episode_steps=3",
        "trainer.max_epochs=2",
    ])
    with caplog.at_level(logging.INFO):
        run(cfg)
    assert "NBS learns from 3 labelled anomalous images" in caplog.text and "synthetic anomalies instead" not in caplog.text
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["num_labelled_anomalies"] == 3
    module = load_model(tmp_path)
    first, *rest = [torch.cat([p.flatten() for p in s.parameters()]) for s in module.model.snapshots]
    assert all(not torch.equal(first, other) for other in rest)
