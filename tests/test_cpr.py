"""CPR's pieces: block histograms and their KL retrieval, the region-restricted nearest neighbour
against the authors' unfold formula, the point pairs, the foreground discriminant, the loss's
zero at a perfect match, and the gallery rebuilt from the stored images."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import entropy

from anomalib_lite.models.cpr.torch_model import (
    ContrastiveRetrievalLoss,
    CprModel,
    PointPairs,
    block_histograms,
    fit_foreground_discriminant,
    histogram_distances,
    region_min_distance,
    trimmed_min_max,
)

BACKBONE = {"name": "resnet18", "weights": "none"}


def test_block_histograms_count_words_per_block_with_padding_as_word_zero() -> None:
    codes = torch.tensor([[0, 0, 1, 1], [0, 2, 1, 1], [2, 2, 0, 0], [2, 2, 0, 1]])[None]
    histograms = block_histograms(codes, grid=2, num_words=3)
    assert histograms.shape == (1, 4, 4)
    expected = torch.tensor([[0, 0.75, 0, 0.25], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0.75, 0.25, 0]])
    torch.testing.assert_close(histograms[0], expected)
    # 5 x 5 in a 2 x 2 grid: blocks of 3, one padded row and column at the bottom and right.
    padded = block_histograms(torch.zeros(1, 5, 5, dtype=torch.long), grid=2, num_words=3)
    assert padded.shape == (1, 4, 4)
    torch.testing.assert_close(padded[0, 0], torch.tensor([0, 1.0, 0, 0]))
    torch.testing.assert_close(padded[0, 3], torch.tensor([5 / 9, 4 / 9, 0, 0]))
    assert block_histograms(torch.zeros(2, 16, 16, dtype=torch.long), grid=5, num_words=3).shape == (2, 25, 4)


def test_histogram_distances_sum_the_best_blocks_kl_divergences() -> None:
    generator = torch.Generator().manual_seed(0)
    query = torch.rand(2, 5, 4, generator=generator).softmax(-1)
    bank = torch.rand(3, 5, 4, generator=generator).softmax(-1)
    distances = histogram_distances(query, bank, keep=0.8)
    for i in range(2):
        for j in range(3):
            per_block = sorted(entropy(query[i, b].numpy() + 1e-8, bank[j, b].numpy() + 1e-8) for b in range(5))
            # scipy normalises the distributions; the 1e-8 makes that a 1e-7 relative change.
            assert float(distances[i, j]) == pytest.approx(sum(per_block[:4]), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("region", [1, 3, 5])
def test_region_min_distance_is_the_authors_unfold_formula(region: int) -> None:
    generator = torch.Generator().manual_seed(region)
    query = F.normalize(torch.randn(2, 6, 7, 9, generator=generator), dim=1)
    gallery = F.normalize(torch.randn(2, 3, 6, 7, 9, generator=generator), dim=2)
    result = region_min_distance(query, gallery.flatten(0, 1), torch.arange(6).view(2, 3), region)
    for b in range(2):
        unfold = torch.nn.Unfold(kernel_size=region, padding=region // 2)
        windows = unfold(gallery[b]).reshape(3, 6, -1, 7, 9)  # K x C x r^2 x h x w
        distance = 1 - (query[b][None, :, None] * windows).sum(1)
        counts = unfold(torch.ones(1, 1, 7, 9)).reshape(1, -1, 7, 9)
        expected = (distance / (counts + 1e-8)).amin(1).amin(0)
        torch.testing.assert_close(result[b], expected, rtol=1e-5, atol=1e-5)


def test_point_pairs_respect_the_mask_and_the_negative_distance() -> None:
    masks = torch.zeros(2, 32, 32)
    masks[0, 4:12, 4:12] = 1
    pairs = PointPairs(count=50, negative_distance=6.0)(masks, None, torch.Generator().manual_seed(0))
    assert pairs["positive"].shape == (2, 50, 2)
    for b in range(2):
        positive = pairs["positive"][b][pairs["positive_weight"][b] > 0].long()
        assert len(positive) == 50 and not bool(masks[b, positive[:, 1], positive[:, 0]].any())
        kept = pairs["negative_weight"][b] > 0
        gap = (pairs["negative"][b][kept] - pairs["negative_reference"][b][kept]).norm(dim=1)
        assert bool((gap > 6.0).all()) and int(kept.sum()) > 10
    anomalies = pairs["anomaly"][0][pairs["anomaly_weight"][0] > 0].long()
    assert len(anomalies) == 50 and bool(masks[0, anomalies[:, 1], anomalies[:, 0]].all())
    assert not bool((pairs["anomaly_weight"][1] > 0).any())  # a clean image has no anomaly points


def test_foreground_discriminant_separates_centre_from_border() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(6, 4, 20, 20, generator=generator) * 0.1
    features[:, 0, 5:15, 5:15] += 2.0  # the object: a distinct feature in the middle
    weight, bias = fit_foreground_discriminant(features, seed=0)
    foreground = (torch.einsum("bchw,c->bhw", features, weight) + bias).clamp(0, 1)
    assert float(foreground[:, 7:13, 7:13].mean()) > 0.9
    assert float(foreground[:, :2].mean()) < 0.1
    low, high = trimmed_min_max(torch.arange(1000.0))
    assert (low, high) == (9.0, 990.0)


def test_contrastive_loss_hinges() -> None:
    loss = ContrastiveRetrievalLoss(0.8, -0.2, exponent=3)
    positive, negative = loss(torch.tensor([[1.0, 0.5]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[-0.5, 0.3]]), torch.tensor([[1.0, 1.0]]))
    assert float(positive) == pytest.approx(0.3**3 / 2)
    assert float(negative) == pytest.approx(0.5**3 / 2)


@pytest.fixture(scope="module")
def fitted_cpr() -> CprModel:
    torch.manual_seed(0)
    model = CprModel(BACKBONE, levels=(1, 2), descriptor_dim=16, num_retrieved=3, num_words=4, points_per_kind=40)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 64, 64, generator=generator) * 0.2
    for index, image in enumerate(images):  # an object of another size in each image: distinct histograms
        image[:, 24 - 3 * index : 40 + 3 * index, 24 - 3 * index : 40 + 3 * index] += 0.6
    model.eval()
    model.prepare(model.preparation_statistics(images))
    return model


def test_training_images_retrieve_others_and_themselves_first_at_test(fitted_cpr: CprModel) -> None:
    neighbours = fitted_cpr.train_neighbours
    assert neighbours.shape == (6, 3)
    assert not bool((neighbours == torch.arange(6)[:, None]).any())
    images = fitted_cpr.train_images.float() / 255
    histograms = fitted_cpr.describe(fitted_cpr.feature_extractor(images)[1])
    distances = histogram_distances(histograms, fitted_cpr.histograms)
    torch.testing.assert_close(distances.diagonal(), torch.zeros(6), atol=1e-5, rtol=0)
    retrieved = fitted_cpr.retrieve(fitted_cpr.feature_extractor(images)[1])
    assert torch.equal(distances.gather(1, retrieved[:, :1])[:, 0], distances.min(dim=1).values)


def test_pair_loss_vanishes_for_identical_pairs_without_negatives(fitted_cpr: CprModel) -> None:
    images = fitted_cpr.train_images[:2].float() / 255
    masks = torch.zeros(2, 64, 64)
    fitted_cpr.is_object = False
    try:
        terms = fitted_cpr.pair_loss(images, images, masks, None, torch.Generator().manual_seed(0))
    finally:
        fitted_cpr.is_object = True
    assert float(terms["loss"]) == pytest.approx(0.0, abs=1e-9)
    masks[0, 10:30, 10:30] = 1  # anomaly points pair a position with itself: cos 1, far above -0.2
    terms = fitted_cpr.pair_loss(images, images, masks, None, torch.Generator().manual_seed(0))
    assert float(terms["negative"]) > 0


def test_gallery_is_rebuilt_after_training_and_from_a_state_dict(fitted_cpr: CprModel) -> None:
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = fitted_cpr(images)
    assert fitted_cpr._gallery is not None
    fitted_cpr.train()
    assert fitted_cpr._gallery is None
    fitted_cpr.eval()
    rebuilt = CprModel(BACKBONE, levels=(1, 2), descriptor_dim=16, num_retrieved=3, num_words=4, points_per_kind=40).eval()
    rebuilt.load_state_dict(fitted_cpr.state_dict())
    with torch.no_grad():
        after = rebuilt(images)
    torch.testing.assert_close(after.pred_score, before.pred_score)
    assert after.anomaly_map.shape == (2, 64, 64)
    assert math.isfinite(float(after.pred_score.sum()))


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="one size per level"):
        CprModel(BACKBONE, levels=(1, 2), region_sizes=(3,))
    with pytest.raises(ValueError, match="odd"):
        CprModel(BACKBONE, levels=(1, 2), region_sizes=(2, 1))
    model = CprModel(BACKBONE, levels=(1,), region_sizes=(3,))
    with pytest.raises(ValueError, match="at least 2"):
        model.prepare(model.preparation_statistics(torch.rand(1, 3, 32, 32)))
