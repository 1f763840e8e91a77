"""Uninformed Students' pieces: dense extraction against per-patch extraction, the ensemble's error
and variance on hand cases, the teacher losses, the standardisations, the cached teachers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.uninformed_students import UninformedStudentsModel
from anomalib_lite.models.uninformed_students.patch_network import PatchDescriptor
from anomalib_lite.models.uninformed_students.teacher import (
    compactness_loss,
    load_or_distill_teachers,
    triplet_loss,
)
from anomalib_lite.models.uninformed_students.torch_model import ensemble_error_and_variance


@pytest.mark.parametrize("patch_size", [17, 33, 65])
def test_dense_extraction_equals_the_patch_network_at_every_position(patch_size: int) -> None:
    torch.manual_seed(0)
    network = PatchDescriptor(patch_size, descriptor_dim=8).double()
    images = torch.rand(2, 3, 37, 34, dtype=torch.double)
    dense = network.dense(images)
    assert dense.shape == (2, 8, 37, 34)
    padded = network.pad(images)
    # The corners, the centre and random positions, each through the patch network on its own patch.
    positions = [(0, 0), (0, 33), (36, 0), (36, 33), (18, 17)]
    positions += [tuple(int(v) for v in pair) for pair in zip(torch.randint(37, (15,)), torch.randint(34, (15,)))]
    patches = torch.stack([padded[:, :, y : y + patch_size, x : x + patch_size] for y, x in positions], dim=1)
    with torch.no_grad():
        per_patch = network(patches.flatten(0, 1)).view(2, len(positions), 8)
    at_positions = torch.stack([dense[:, :, y, x] for y, x in positions], dim=1)
    assert torch.allclose(at_positions, per_patch, atol=1e-12)


def test_patch_networks_map_a_patch_to_one_descriptor() -> None:
    for patch_size in (17, 33, 65):
        assert PatchDescriptor(patch_size, 128)(torch.rand(4, 3, patch_size, patch_size)).shape == (4, 128)
    with pytest.raises(UserInputError, match="patch sizes"):
        PatchDescriptor(21)


def test_ensemble_error_and_variance_on_a_hand_case() -> None:
    # Two students, 2-dim descriptors at one pixel: (1, 0) and (3, 2); the teacher says (0, 0).
    predictions = torch.tensor([[1.0, 0.0], [3.0, 2.0]]).view(2, 1, 2, 1, 1)
    error, variance = ensemble_error_and_variance(predictions, torch.zeros(1, 2, 1, 1))
    # mean (2, 1): error 2^2 + 1^2 = 5; variance per dim (1 + 1), summed: mean |mu|^2 - |mean|^2 = (1 + 13)/2 - 5 = 2.
    assert float(error) == pytest.approx(5.0)
    assert float(variance) == pytest.approx(2.0)
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 1, 2, 1, 1)
    assert float(ensemble_error_and_variance(agreeing, torch.zeros(1, 2, 1, 1))[1]) == 0.0


def test_teacher_losses_on_hand_cases() -> None:
    descriptors = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    correlation = np.corrcoef(descriptors.numpy().T)
    off_diagonal = correlation[~np.eye(4, dtype=bool)]
    assert float(compactness_loss(descriptors, "signed")) == pytest.approx(off_diagonal.sum(), abs=1e-5)
    assert float(compactness_loss(descriptors)) == pytest.approx((off_diagonal**2).mean(), abs=1e-6)
    with pytest.raises(ValueError, match="squared"):
        compactness_loss(descriptors, "absolute")
    anchor, positive = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    # d+ = 1; negatives at squared distance 9 from the anchor and 4 from the positive: d- = 4.
    negative = torch.tensor([[3.0, 0.0]])
    assert float(triplet_loss(anchor, positive, negative, margin=1.0)) == pytest.approx(0.0)
    assert float(triplet_loss(anchor, positive, negative, margin=4.0)) == pytest.approx(1.0)


def test_standardisations_of_the_teacher_and_of_the_scores() -> None:
    model = UninformedStudentsModel(patch_sizes=(17,), num_students=2, descriptor_dim=8).eval()
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    model.prepare(torch.cat([model.preparation_statistics(images[:1]), model.preparation_statistics(images[1:])]))
    padded = model.teachers[0].pad(model.normalize(images))
    standardised = model.teacher_descriptors(0, padded).transpose(0, 1).flatten(1)
    assert torch.allclose(standardised.mean(dim=1), torch.zeros(8), atol=1e-4)
    assert torch.allclose(standardised.std(dim=1, unbiased=False), torch.ones(8), atol=1e-3)
    maps = model.calibration_maps(images)
    model.calibrate(maps)
    output = model(images)
    # Error and variance standardised on these images: their sum has mean 0 over the pixels.
    assert float(output.anomaly_map.mean()) == pytest.approx(0.0, abs=1e-3)
    assert output.anomaly_map.shape == (3, 40, 40)


def test_students_learn_and_teachers_do_not() -> None:
    model = UninformedStudentsModel(patch_sizes=(17, 33), num_students=2, descriptor_dim=8, train_crop=8).train()
    loss = model.loss(torch.rand(2, 3, 48, 48))
    loss.backward()
    assert all(p.grad is None for p in model.teachers.parameters())
    assert all(p.grad is not None for p in model.students.parameters())


def test_teachers_are_cached_per_patch_size(tmp_path) -> None:
    backbone = {"name": "tf_efficientnet_lite0", "weights": "none", "mean": [0.5] * 3, "std": [0.5] * 3}
    model = UninformedStudentsModel(patch_sizes=(17, 33), num_students=1, descriptor_dim=8)
    settings = {"images": None, "cache_dir": tmp_path, "steps": 2, "batch_size": 4, "image_size": 96, "backbone_input": 32}
    load_or_distill_teachers(model.teachers, backbone, model.normalize, **settings)
    assert len(list(tmp_path.glob("uninformed_students_teacher_p*.pt"))) == 2
    again = UninformedStudentsModel(patch_sizes=(17, 33), num_students=1, descriptor_dim=8)
    load_or_distill_teachers(again.teachers, backbone, again.normalize, **settings)
    for first, second in zip(model.teachers.parameters(), again.teachers.parameters()):
        assert torch.equal(first, second)


def test_distillation_trains_the_teacher_and_leaves_it_frozen(tmp_path) -> None:
    # The model freezes its teachers; distillation must train them all the same (it once trained
    # only its decoder, leaving the teacher at its random initialisation).
    backbone = {"name": "tf_efficientnet_lite0", "weights": "none", "mean": [0.5] * 3, "std": [0.5] * 3}
    model = UninformedStudentsModel(patch_sizes=(17,), num_students=1, descriptor_dim=8)
    initial = [p.detach().clone() for p in model.teachers.parameters()]
    settings = {"images": None, "cache_dir": tmp_path, "steps": 2, "batch_size": 4, "image_size": 96, "backbone_input": 32}
    load_or_distill_teachers(model.teachers, backbone, model.normalize, **settings)
    assert not any(torch.equal(before, after) for before, after in zip(initial, model.teachers.parameters()))
    assert not any(p.requires_grad for p in model.teachers.parameters())


def test_scoring_with_some_scales_or_students_of_one_trained_model() -> None:
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(4))
    full = UninformedStudentsModel(patch_sizes=(17, 33), num_students=3, descriptor_dim=8).eval()
    single = UninformedStudentsModel(patch_sizes=(17, 33), num_students=3, descriptor_dim=8, score_patch_sizes=[33], score_students=1).eval()
    single.load_state_dict(full.state_dict())
    assert single.calibration_maps(images).shape == (2, 2, 40, 40)
    error, _ = ensemble_error_and_variance(
        full.students[1][0].dense(full.teachers[1].pad(full.normalize(images)), padded=True).unsqueeze(0),
        full.teacher_descriptors(1, full.teachers[1].pad(full.normalize(images))),
    )
    assert torch.allclose(single.calibration_maps(images)[:, 0], error, atol=1e-5)
    assert float(single.calibration_maps(images)[:, 1].abs().max()) == 0  # one student: no variance
    # The full score (eq. 7): error and variance standardised, summed per scale, averaged over the scales.
    maps = full.calibration_maps(images)  # error, variance of scale 17, then of scale 33
    full.calibrate(maps)
    standardised = (maps - maps.mean((0, 2, 3), keepdim=True)) / maps.std((0, 2, 3), keepdim=True)
    torch.testing.assert_close(full(images).anomaly_map, standardised.sum(dim=1) / 2, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserInputError, match="score_patch_sizes"):
        UninformedStudentsModel(patch_sizes=(17,), score_patch_sizes=[65])
    with pytest.raises(UserInputError, match="score_students"):
        UninformedStudentsModel(patch_sizes=(17,), num_students=2, score_students=3)
