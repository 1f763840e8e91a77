"""Patch-level and retrieval methods (SPADE, Patch SVDD) against brute-force references, without
Lightning, and the RdMVTec protocol they are compared under."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomalib_lite.data.protocols import RandomRotationCrop
from anomalib_lite.models.components import average_over_patches
from anomalib_lite.models.patch_svdd.torch_model import (
    DIRECTIONS,
    PatchSvddModel,
    PositionClassifier,
    grid_offsets,
    jitter_offsets,
    position_pair_offsets,
)
from anomalib_lite.models.spade import SpadeModel

BACKBONE = {"name": "tf_efficientnet_lite0", "weights": "none", "mean": [0.5] * 3, "std": [0.5] * 3}


def brute_force_spade(model: SpadeModel, train: torch.Tensor, image: torch.Tensor, k: int, per_level: bool) -> tuple[float, torch.Tensor]:
    """SPADE written out with cdist over every pair: image score and (unblurred) map of one image."""
    features_train = model.feature_extractor(train)
    features_test = model.feature_extractor(image)
    global_train = features_train[model.global_level].mean(dim=(2, 3))
    global_test = features_test[model.global_level].mean(dim=(2, 3))
    distances = torch.cdist(global_test, global_train)[0]
    nearest = distances.argsort()[:k]
    score = float(distances[nearest].mean())

    def grid(features: dict[int, torch.Tensor], levels: list[int]) -> torch.Tensor:
        size = features[levels[0]].shape[-2:]
        return torch.cat([F.interpolate(features[lv], size=size, mode="bilinear", align_corners=False) for lv in levels], dim=1)

    groups = [[level] for level in model.levels] if per_level else [model.levels]
    maps = []
    for levels in groups:
        query, gallery = grid(features_test, levels)[0], grid(features_train, levels)[nearest]
        channels, h, w = query.shape
        pairwise = torch.cdist(query.reshape(channels, -1).T, gallery.permute(1, 0, 2, 3).reshape(channels, -1).T)
        distance_map = pairwise.min(dim=1).values.view(1, 1, h, w)
        maps.append(F.interpolate(distance_map, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0])
    return score, torch.stack(maps).mean(dim=0)


@pytest.mark.parametrize("pyramid_matching", ["concatenated", "per_level"])
def test_spade_two_stage_retrieval_equals_brute_force(pyramid_matching: str) -> None:
    torch.manual_seed(0)
    k = 3
    model = SpadeModel(BACKBONE, num_neighbors=k, pyramid_matching=pyramid_matching, blur_sigma=0, nn_chunk_size=37).eval()
    train = torch.rand(7, 3, 64, 64)
    model.fit(model.embed(train))
    images = torch.rand(2, 3, 64, 64)
    output = model(images)
    for b in range(2):
        score, expected_map = brute_force_spade(model, train, images[b : b + 1], k, pyramid_matching == "per_level")
        assert output.pred_score[b].item() == pytest.approx(score, rel=1e-4)
        torch.testing.assert_close(output.anomaly_map[b], expected_map, atol=1e-3, rtol=1e-3)


def test_spade_pixel_gallery_is_the_retrieved_images_only() -> None:
    """A patch that exists only in a training image outside the K retrieved ones still scores high."""
    torch.manual_seed(0)
    model = SpadeModel(BACKBONE, levels=[1], num_neighbors=1, blur_sigma=0).eval()
    train = torch.rand(4, 3, 128, 128)
    model.fit(model.embed(train))
    image = train[:1].clone()
    image[..., 40:88, 40:88] = train[1:2, :, 40:88, 40:88]  # a region copied from another training image
    _, neighbours = model.retrieve(model.embed(image)["global"])
    assert neighbours.tolist() == [[0]]
    anomaly_map = model(image).anomaly_map[0]
    # Far from the region the image is training image 0 itself: distance 0 (to float rounding of the
    # expanded square); inside, no match in image 0.
    peak = anomaly_map.max()
    assert anomaly_map[:16, :16].abs().max() < 0.01 * peak and anomaly_map[56:72, 56:72].min() > 0.3 * peak
    # Against all four images (one global kNN, not SPADE), the copied region finds its match.
    model.num_neighbors = 4
    assert model(image).anomaly_map[0, 56:72, 56:72].max() < 0.01 * peak


def test_spade_retrieves_every_image_when_fewer_than_k() -> None:
    model = SpadeModel(BACKBONE, num_neighbors=50, blur_sigma=0).eval()
    train = torch.rand(3, 3, 32, 32)
    model.fit(model.embed(train))
    scores, neighbours = model.retrieve(model.embed(torch.rand(2, 3, 32, 32))["global"])
    assert neighbours.shape == (2, 3) and sorted(neighbours[0].tolist()) == [0, 1, 2]


# -- Patch SVDD --------------------------------------------------------------------------------------
def test_patch_svdd_dense_features_equal_per_patch_features() -> None:
    """One pass over the image gives every grid patch's feature as the authors' per-patch encoder
    would: the 32 px encoder on the patch, and for 64 px its four quarters assembled into a 2 x 2 grid."""
    torch.manual_seed(0)
    model = PatchSvddModel(stride_64=16, stride_32=4).eval()
    model.prepare(torch.zeros(1, 3, 100, 128))
    images = torch.rand(2, 3, 100, 128) - 0.5
    with torch.no_grad():
        embedding = model.embed(images)
        assert embedding["k64"].shape == (2, 64, len(grid_offsets(100, 64, 16)), len(grid_offsets(128, 64, 16)))
        assert embedding["k32"].shape == (2, 64, len(grid_offsets(100, 32, 4)), len(grid_offsets(128, 32, 4)))
        for i, y in enumerate(grid_offsets(100, 32, 4)[::5]):
            for j, x in enumerate(grid_offsets(128, 32, 4)[::7]):
                patch = images[:, :, y : y + 32, x : x + 32]
                torch.testing.assert_close(embedding["k32"][:, :, 5 * i, 7 * j], model.encoder.small(patch)[:, :, 0, 0])
        small = model.encoder.small
        for i, y in enumerate(grid_offsets(100, 64, 16)):
            for j, x in enumerate(grid_offsets(128, 64, 16)):
                patch = images[:, :, y : y + 64, x : x + 64]
                quarters = [small(patch[:, :, r : r + 32, c : c + 32]) for r in (0, 32) for c in (0, 32)]
                grid = torch.cat([torch.cat(quarters[:2], dim=3), torch.cat(quarters[2:], dim=3)], dim=2)  # B x D x 2 x 2
                hidden = F.leaky_relu(F.conv2d(grid, model.encoder.combine.weight, model.encoder.combine.bias), 0.1)
                expected = torch.tanh(model.encoder.project(hidden))[:, :, 0, 0]
                torch.testing.assert_close(embedding["k64"][:, :, i, j], expected)


@pytest.mark.parametrize("size", [32, 64])
def test_patch_svdd_position_offsets_and_jitter_ranges(size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    offsets, labels = position_pair_offsets(4000, size, generator)
    directions = torch.tensor(DIRECTIONS)[labels]
    assert set(labels.tolist()) == set(range(8))
    # Along a moving axis: 3K/4 + U{0..K/4 - 1} in the class's direction; along a still axis: 0.
    moving = directions != 0
    magnitude = offsets.abs()
    assert torch.equal(torch.sign(offsets), directions)
    assert int(magnitude[moving].min()) == 3 * size // 4 and int(magnitude[moving].max()) == size - 1
    assert int(magnitude[~moving].abs().max()) == 0
    jitter = jitter_offsets(4000, size, generator)
    reach = size // 32
    assert int(jitter.abs().max()) == reach and not bool((jitter == 0).all(dim=1).any())
    assert set(jitter.flatten().tolist()) == set(range(-reach, reach + 1))


def test_average_over_patches_against_a_loop() -> None:
    torch.manual_seed(0)
    scores = torch.rand(2, 3, 4)
    rows, columns = [0, 5, 9], [0, 4, 8, 11]
    expected_total, expected_count = torch.zeros(2, 20, 22), torch.zeros(20, 22)
    for i, y in enumerate(rows):
        for j, x in enumerate(columns):
            expected_total[:, y : y + 8, x : x + 8] += scores[:, i, j].view(-1, 1, 1)
            expected_count[y : y + 8, x : x + 8] += 1
    expected = expected_total / expected_count.clamp_min(1)
    torch.testing.assert_close(average_over_patches(scores, (20, 22), 8, rows, columns), expected)
    assert bool((average_over_patches(scores, (20, 22), 8, rows, columns)[:, 17:, :] == 0).all())  # uncovered rows


def test_patch_svdd_classifier_head_weight_is_fixed_in_the_authors_variant() -> None:
    for head, learns in (("fixed_normalized", False), ("linear", True)):
        classifier = PositionClassifier(64, head)
        logits = classifier(torch.randn(5, 64), torch.randn(5, 64))
        F.cross_entropy(logits, torch.arange(5)).backward()
        assert (classifier.out.weight.grad is not None) == learns and classifier.out.bias.grad is not None


def test_patch_svdd_scores_a_training_image_zero_and_trains() -> None:
    torch.manual_seed(0)
    model = PatchSvddModel()
    train = torch.rand(3, 3, 96, 96)
    model.prepare(train)
    generator = torch.Generator().manual_seed(0)
    terms = model.loss_terms(train, torch.tensor([0, 1, 2, 0]), generator)
    assert set(terms) == {"loss", "ssl_64", "ssl_32", "svdd_64", "svdd_32"}
    torch.testing.assert_close(terms["loss"], terms["ssl_64"] + terms["ssl_32"] + terms["svdd_64"] + terms["svdd_32"])
    terms["loss"].backward()
    assert model.encoder.combine.weight.grad is not None and model.encoder.small.convs[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        model.fit(model.embed(train))
        assert model.bank_64.shape == (3 * 3 * 3, 64) and model.bank_32.shape == (3 * 17 * 17, 64)
        # A training image's patches are in the banks (distance 0 up to rounding); a new image's are not.
        # (Random weights: features vary by ~3e-4, so the scale is small.)
        assert float(model(torch.rand(1, 3, 96, 96)).pred_score) > 50 * float(model(train[:1]).pred_score)


# -- RdMVTec ---------------------------------------------------------------------------------------
def test_rd_protocol_moves_image_and_mask_together_and_is_fixed_per_image() -> None:
    geometry = RandomRotationCrop((64, 64), (48, 48), max_angle=10, seed=3)
    image = torch.zeros(3, 64, 64)
    image[:, 20:40, 24:44] = 1.0  # a bright square; its mask is the same square
    mask = image[0].clone()
    placements = {geometry.placement(f"/data/{i}.png") for i in range(50)}
    assert len(placements) == 50  # every image its own draw
    assert all(abs(p.angle) <= 10 and 0 <= p.top <= 16 and 0 <= p.left <= 16 for p in placements)
    assert max(abs(p.angle) for p in placements) > 7 and len({p.top for p in placements}) > 8
    for key in ("/data/a.png", "/data/b.png"):
        moved_image, moved_mask = geometry.image(image, key), geometry.mask(mask, key)
        assert moved_image.shape == (3, 48, 48) and moved_mask.shape == (48, 48)
        assert set(moved_mask.unique().tolist()) <= {0.0, 1.0}  # nearest: still a 0/1 mask
        # The mask covers the transformed square: the pixels that are surely inside or outside agree.
        assert bool((moved_image[0][moved_mask == 1] > 0.5).float().mean() > 0.95)
        assert bool((moved_image[0][moved_mask == 0] < 0.5).float().mean() > 0.95)
        # Reproducible per image: another transform object with the same seed draws the same.
        again = RandomRotationCrop((64, 64), (48, 48), max_angle=10, seed=3)
        assert torch.equal(again.image(image, key), moved_image) and again.placement(key) == geometry.placement(key)
    assert RandomRotationCrop((64, 64), (48, 48), seed=4).placement("/data/a.png") != geometry.placement("/data/a.png")
