"""RegAD's pieces: the STN starts as the identity, the registered features are the backbone's at
init, the support augmentation, the Siamese loss's stop-gradient, the registration's batches and
its leave-one-category-out rule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components import FeatureExtractor
from anomalib_lite.models.regad.registration import epoch_batches, resolve_categories, train_registration
from anomalib_lite.models.regad.torch_model import (
    NUM_SUPPORT_VIEWS,
    STN_IDENTITY,
    RegadModel,
    RegistrationHead,
    SpatialTransformer,
    affine_grid,
    affine_matrices,
    augment_support,
    invert_affine,
    warp,
)

BACKBONE = {"name": "resnet18", "weights": "none"}


@pytest.mark.parametrize("mode", sorted(STN_IDENTITY))
def test_stn_is_the_identity_at_init(mode: str) -> None:
    torch.manual_seed(0)
    stn = SpatialTransformer(8, level=2, mode=mode).eval()
    features = torch.randn(3, 8, 12, 12)
    transformed, theta = stn(features)
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(3, 2, 3), atol=1e-6)
    assert torch.allclose(transformed, features, atol=1e-5)


def test_affine_matrices_rotation_scale_as_the_code_builds_them() -> None:
    angle, s1, s2 = 0.3, 1.2, 0.8
    theta = affine_matrices("rotation_scale", torch.tensor([[angle, s1, s2]]))[0]
    c, s = math.cos(angle), math.sin(angle)
    assert torch.allclose(theta, torch.tensor([[c * s1, -s, 0.0], [s, c * s2, 0.0]]))
    full = torch.cat([theta, torch.tensor([[0.0, 0.0, 1.0]])])
    assert torch.allclose(torch.cat([invert_affine(theta[None])[0], torch.tensor([[0.0, 0.0, 1.0]])]) @ full, torch.eye(3), atol=1e-6)


def test_registered_features_are_the_backbones_at_init() -> None:
    torch.manual_seed(0)
    model = RegadModel(BACKBONE, levels=(1, 2, 3))
    plain = FeatureExtractor("resnet18", (1, 2, 3), weights="none", mean=(0, 0, 0), std=(1, 1, 1), frozen=False)
    plain.load_state_dict(model.registration.network.feature_extractor.state_dict())
    plain.eval()
    images = torch.rand(2, 3, 64, 64)
    registered = model.registration.network.registered(images)
    with torch.no_grad():
        reference = list(plain(images).values())
    assert [r.shape for r in registered] == [r.shape for r in reference]
    for ours, theirs in zip(registered, reference):
        assert torch.allclose(ours, theirs, atol=1e-4 * float(theirs.abs().max()))


def test_back_warping_undoes_the_transform_inside_the_image() -> None:
    # A smooth map rotated and warped back by the inverse: the centre returns (the borders reflect).
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    features = torch.stack([torch.sin(xx / 4), torch.cos(yy / 5), torch.sin((xx + yy) / 6)])[None]
    theta = affine_matrices("rotation", torch.tensor([[0.3]]))
    rotated = warp(features, theta)
    restored = warp(rotated, invert_affine(theta))
    centre = (slice(None), slice(None), slice(10, 22), slice(10, 22))
    assert (restored - features)[centre].abs().max() < 0.05
    assert (rotated - features)[centre].abs().max() > 0.3  # the rotation itself moved it


def test_support_augmentation_views() -> None:
    images = torch.rand(2, 3, 16, 16)
    views = augment_support(images)
    assert views.shape == (2, NUM_SUPPORT_VIEWS, 3, 16, 16) and NUM_SUPPORT_VIEWS == 22
    assert torch.equal(views[:, 0], images)
    assert torch.allclose(views[:, 17], images.flip(-1))  # the flip
    grey = views[:, 18]
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 0], 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2], atol=1e-5)
    assert torch.allclose(views[:, 20], images.rot90(2, dims=(-2, -1)), atol=1e-5)  # half a turn
    quarter = views[:, 19]
    assert torch.allclose(quarter, images.rot90(1, dims=(-2, -1)), atol=1e-5) or torch.allclose(quarter, images.rot90(-1, dims=(-2, -1)), atol=1e-5)


def test_siamese_loss_stops_the_gradient_at_the_targets() -> None:
    torch.manual_seed(0)
    head = RegistrationHead(8, 16).eval()
    query, support = torch.randn(2, 8, 5, 5, requires_grad=True), torch.randn(2, 8, 5, 5, requires_grad=True)
    head.loss(query, support).backward()
    # Reference: the same loss with explicitly detached targets, through a copy of the head.
    query2, support2 = query.detach().clone().requires_grad_(), support.detach().clone().requires_grad_()
    z1, z2 = head.encoder(query2), head.encoder(support2)
    p1, p2 = head.predictor(z1), head.predictor(z2)
    reference = -(F.cosine_similarity(p1, z2.detach(), dim=1).mean() + F.cosine_similarity(p2, z1.detach(), dim=1).mean()) / 2
    reference.backward()
    assert torch.allclose(query.grad, query2.grad, atol=1e-6) and torch.allclose(support.grad, support2.grad, atol=1e-6)
    # Without the stop-gradient the gradients differ: the test can tell.
    query3 = query.detach().clone().requires_grad_()
    z1, z2 = head.encoder(query3), head.encoder(support.detach())
    (-(F.cosine_similarity(head.predictor(z1), z2, dim=1).mean() + F.cosine_similarity(head.predictor(z2), z1, dim=1).mean()) / 2).backward()
    assert not torch.allclose(query3.grad, query2.grad, atol=1e-6)


def test_epoch_batches_visit_every_image_once_with_supports_from_the_rest() -> None:
    sizes, batch_size, shots = [7, 12], 5, 3
    batches = epoch_batches(sizes, batch_size, shots, torch.Generator().manual_seed(0))
    assert len(batches) == 2 + 3
    for category, size in enumerate(sizes):
        queries = torch.cat([q for c, q, _ in batches if c == category])
        assert sorted(queries.tolist()) == list(range(size))
    for category, queries, supports in batches:
        assert len(queries) <= batch_size and supports.shape == (len(queries), shots)
        assert (supports != queries[:, None]).all() and supports.min() >= 0 and supports.max() < sizes[category]


def test_registration_categories_leave_the_runs_own_out(tmp_path: Path) -> None:
    own, other = tmp_path / "own" / "train" / "good", tmp_path / "other"
    for folder in (own, other):
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    run_images = [own / "0.png", own / "1.png"]
    assert resolve_categories([str(other)], tmp_path / "synthetic", run_images) == [other]
    with pytest.raises(UserInputError, match="leave-one-category-out"):
        resolve_categories([str(other), str(own)], tmp_path / "synthetic", run_images)
    with pytest.raises(UserInputError, match="not found"):
        resolve_categories([str(tmp_path / "missing")], tmp_path / "synthetic", run_images)
    synthetic = resolve_categories(["synthetic"], tmp_path / "synthetic", run_images, run_synthetic_category="stripes")
    assert [f.parent.parent.name for f in synthetic] == ["weave", "disc"]


def test_registration_training_lowers_the_loss_and_fitting_scores() -> None:
    torch.manual_seed(0)
    model = RegadModel(BACKBONE, levels=(1, 2, 3), head_channels=32)
    generator = torch.Generator().manual_seed(1)
    base = torch.rand(1, 3, 64, 64, generator=generator)
    category = ((base + 0.05 * torch.rand(12, 3, 64, 64, generator=generator)).clamp(0, 1) * 255).to(torch.uint8)
    report = train_registration(model.registration, [category], shots=2, epochs=2, batch_size=6, lr=1e-2, momentum=0.9, seed=0)
    assert report["steps"] == 4 and report["images"] == 12 and math.isfinite(report["loss"])
    assert not model.registration.training and not any(p.requires_grad for p in model.registration.parameters())
    support = category[:2].float() / 255
    model.fit(model.embed(support))
    normal = category[2:4].float() / 255
    anomalous = normal.clone()
    anomalous[:, :, 20:40, 20:40] = 1 - anomalous[:, :, 20:40, 20:40]
    output = model(torch.cat([normal, anomalous]))
    assert output.anomaly_map.shape == (4, 64, 64)
    assert output.pred_score[2:].min() > output.pred_score[:2].max()


@pytest.mark.parametrize(("height", "width"), [(24, 24), (12, 17), (1, 5)])
def test_affine_grid_is_torchs_bit_for_bit(height: int, width: int) -> None:
    """Written out for OpenVINO (no rule for aten::affine_grid_generator): the same values."""
    theta = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = F.affine_grid(theta, [3, 8, height, width], align_corners=False)
    assert torch.equal(affine_grid(theta, height, width), expected)


def test_invert_affine_matches_the_matrix_inverse() -> None:
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    last_row = theta.new_tensor([0.0, 0.0, 1.0]).expand(5, 1, 3)
    expected = torch.linalg.inv(torch.cat([theta, last_row], dim=1))[:, :2]
    torch.testing.assert_close(invert_affine(theta), expected, rtol=1e-12, atol=1e-12)
