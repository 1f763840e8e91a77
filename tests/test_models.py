"""The methods' math against plain references, without Lightning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components import GreedyCoresetSampler, batched_nearest_neighbors, nearest_neighbors
from anomalib_lite.models.padim import Padim, PadimModel
from anomalib_lite.models.patchcore import PatchcoreModel
from anomalib_lite.models.patchcore.torch_model import distance_preserving_projection, pooling_projection
from anomalib_lite.visualization import (
    COLOUR_BAR_WIDTH,
    LABEL_WIDTH,
    MIN_PANEL_SIDE,
    _colormap_table,
    _wrap,
    font,
    render_heatmap,
)

BACKBONE = {"name": "tf_efficientnet_lite0", "weights": "none", "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.mark.parametrize(("channels", "dim"), [([40, 112], 1024), ([512, 1024], 1024), ([24, 40, 112], 64)])
@pytest.mark.parametrize("per_level", [True, False])
def test_projection_is_adaptive_average_pooling(channels: list[int], dim: int, per_level: bool) -> None:
    x = torch.randn(200, sum(channels), dtype=torch.float64)
    if per_level:  # each level pooled to dim, then the stack pooled to dim
        stacked = torch.cat([F.adaptive_avg_pool1d(part.unsqueeze(1), dim) for part in x.split(channels, dim=1)], dim=2)
        pooled = F.adaptive_avg_pool1d(stacked, dim).squeeze(1)
    else:
        pooled = F.adaptive_avg_pool1d(x.unsqueeze(1), dim).squeeze(1)
    projection = pooling_projection(channels, dim, per_level).double()
    torch.testing.assert_close(x @ projection, pooled)
    compact = distance_preserving_projection(pooling_projection(channels, dim, per_level)).double()
    assert compact.shape[1] == min(sum(channels), dim)
    torch.testing.assert_close(torch.cdist(x @ compact, x @ compact), torch.cdist(pooled, pooled), rtol=1e-5, atol=1e-5)


def test_patchcore_concatenation_embedding_keeps_the_plain_concatenation() -> None:
    plain = PatchcoreModel(BACKBONE, levels=[2, 3], embedding="concatenation")
    pooled = PatchcoreModel(BACKBONE, levels=[2, 3], embedding="per_level", embedding_dim=1024)
    pooled.load_state_dict(plain.state_dict())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    concatenated = plain.aggregate(plain.feature_extractor(images))
    assert plain.feature_dim == sum(plain.feature_extractor.channels)
    torch.testing.assert_close(plain.embed(images), concatenated)
    # Per-level pooling weighs the levels equally: its distances are not the plain ones.
    x, y = plain.embed(images)[0, 0, 0], plain.embed(images)[1, 3, 3]
    u, v = pooled.embed(images)[0, 0, 0], pooled.embed(images)[1, 3, 3]
    assert not torch.allclose((x - y).norm(), (u - v).norm(), rtol=1e-2)
    # Pooling the concatenation once by a whole multiple of its width repeats every channel as often:
    # the plain distances times the square root of the repeats.
    channels = sum(plain.feature_extractor.channels)
    repeated = PatchcoreModel(BACKBONE, levels=[2, 3], embedding="pooled", embedding_dim=4 * channels)
    repeated.load_state_dict(plain.state_dict())
    r, t = repeated.embed(images)[0, 0, 0], repeated.embed(images)[1, 3, 3]
    torch.testing.assert_close((r - t).norm(), 2 * (x - y).norm(), rtol=1e-4, atol=1e-6)


def test_patchcore_reads_the_embedding_of_older_checkpoints() -> None:
    """Before `embedding`, checkpoints said it with pool_per_level and embedding_dim=None."""
    assert PatchcoreModel(BACKBONE, levels=[2, 3], pool_per_level=True).embedding == "per_level"
    assert PatchcoreModel(BACKBONE, levels=[2, 3], pool_per_level=False).embedding == "pooled"
    assert PatchcoreModel(BACKBONE, levels=[2, 3], embedding_dim=None).embedding == "concatenation"
    with pytest.raises(ValueError, match="embedding must be one of"):
        PatchcoreModel(BACKBONE, levels=[2, 3], embedding="concat")


def test_patchcore_scores_and_reweighting_by_hand() -> None:
    model = PatchcoreModel(BACKBONE, levels=[2, 3], embedding_dim=64, num_neighbors=3, blur_sigma=0)
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    model.memory_bank = bank
    embedding = torch.tensor([[[0.5, 0.0], [0.0, 5.0]]])  # one image, two patches
    patch_scores = torch.tensor([[0.5, 2.0]])
    nn_index = torch.tensor([[0, 2]])
    score = model.reweighted_image_score(embedding, patch_scores, nn_index)
    # m_test* = (0, 5), s* = 2, m* = (0, 3); N_3(m*) = m*, (0, 0), (1, 0) at |m_test* - m| = 2, 5, sqrt(26)
    distances = torch.tensor([2.0, 5.0, 26**0.5])
    expected = (1 - torch.exp(distances[0]) / torch.exp(distances).sum()) * 2.0
    torch.testing.assert_close(score, expected.view(1))


def test_patchcore_nearest_neighbour_patch_scores() -> None:
    torch.manual_seed(0)
    model = PatchcoreModel(BACKBONE, levels=[2, 3], embedding_dim=64, blur_sigma=0, nn_chunk_size=50).eval()
    train = torch.rand(3, 3, 64, 64)
    model.fit(model.embed(train))
    assert model.memory_bank.shape == (3 * 8 * 8, model.feature_dim)
    output = model(train[:1])
    # A training image is in the bank: every patch has distance ~0.
    assert output.anomaly_map.abs().max() < 0.05 * model(torch.rand(1, 3, 64, 64)).anomaly_map.mean()
    image = torch.rand(1, 3, 64, 64)
    embedding = model.embed(image).reshape(-1, model.feature_dim)
    expected = torch.cdist(embedding, model.memory_bank).min(dim=1).values.view(1, 8, 8)
    expected_map = F.interpolate(expected.unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=False).squeeze(1)
    torch.testing.assert_close(model(image).anomaly_map, expected_map, atol=1e-3, rtol=1e-3)


def test_padim_gaussians_and_mahalanobis_match_numpy() -> None:
    torch.manual_seed(0)
    model = PadimModel(BACKBONE, levels=[1, 2, 3], num_features=20, blur_sigma=0, fit_chunk_size=7).eval()
    train = torch.rand(30, 3, 32, 32)
    embeddings = model.embed(train)
    assert embeddings.shape == (30, 20, 8, 8)
    model.fit(embeddings)
    flat = embeddings.reshape(30, 20, -1).double().numpy()
    position = 13
    samples = flat[:, :, position]
    np.testing.assert_allclose(model.mean[:, position].numpy(), samples.mean(axis=0), rtol=1e-5, atol=1e-5)
    covariance = np.cov(samples, rowvar=False) + 0.01 * np.eye(20)
    np.testing.assert_allclose(model.inv_covariance[position].numpy(), np.linalg.inv(covariance), rtol=1e-3, atol=1e-3)

    test_image = torch.rand(1, 3, 32, 32)
    test_embedding = model.embed(test_image)
    delta = test_embedding.reshape(20, -1)[:, position].double().numpy() - samples.mean(axis=0)
    expected = np.sqrt(delta @ np.linalg.inv(covariance) @ delta)
    row, col = divmod(position, 8)
    assert model.mahalanobis(test_embedding)[0, row, col].item() == pytest.approx(expected, rel=1e-3)
    output = model(test_image)
    expected_map = F.interpolate(model.mahalanobis(test_embedding).unsqueeze(1), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(output.anomaly_map, expected_map.squeeze(1))
    assert output.pred_score.item() == pytest.approx(output.anomaly_map.max().item())


def test_padim_feature_subset_is_seeded() -> None:
    first = PadimModel(BACKBONE, num_features=50, feature_seed=0)
    again = PadimModel(BACKBONE, num_features=50, feature_seed=0)
    other = PadimModel(BACKBONE, num_features=50, feature_seed=1)
    assert torch.equal(first.feature_index, again.feature_index)
    assert not torch.equal(first.feature_index, other.feature_index)
    assert len(first.feature_index.unique()) == 50


def test_heatmap_sheet_has_three_panels_a_readable_header_and_a_colour_bar() -> None:
    image = torch.rand(3, 40, 50)
    mask = torch.zeros(40, 50)
    mask[10:20, 10:20] = 1
    heat = torch.zeros(40, 50)
    heat[10:20, 10:20] = 1.0
    long_title = "scratch/" + "a_very_long_image_name_" * 12 + "000.png"
    sheet = render_heatmap(image, mask, heat, long_title, "score 5.22e-05, threshold 4.1e-05: ANOMALOUS", anomalous=True)
    factor = -(-MIN_PANEL_SIDE // 40)  # small images are enlarged to at least 128 pixels a side
    panel_w, panel_h = 50 * factor, 40 * factor
    assert sheet.width == 3 * panel_w + COLOUR_BAR_WIDTH + LABEL_WIDTH + 8
    pixels = np.asarray(sheet)
    # The colour bar runs from the colormap's top colour (value 1) to its bottom one (0), beside the panels.
    bar_x = 3 * panel_w + 4
    table = _colormap_table("jet")
    top = next(y for y in range(sheet.height) if np.abs(pixels[y, bar_x].astype(float) - table[255]).max() <= 1)
    assert np.abs(pixels[top + panel_h - 1, bar_x].astype(float) - table[0]).max() <= 1
    assert (pixels[top + 15 * factor, panel_w + 15 * factor] == 255).all()  # ground truth shows the mask
    assert (pixels[top + 2, panel_w + 2] == 0).all()
    assert sheet.height > top + panel_h  # the footer under the panels says what the bar's numbers are
    # The header wraps instead of running off the sheet: every line fits its width, nothing is lost.
    draw = ImageDraw.Draw(sheet)
    lines = _wrap(draw, long_title, sheet.width - 4)
    assert len(lines) > 1 and all(draw.textlength(line, font=font()) <= sheet.width - 4 for line in lines)
    assert "".join(lines).replace(" ", "") == long_title.replace(" ", "")
    no_mask = np.asarray(render_heatmap(image, None, heat, "good/000.png", "score 0.1"))
    assert (no_mask[top + 5, panel_w + 5] == 128).all()


def test_heatmap_text_renders_non_ascii_letters_not_boxes() -> None:
    """Names in other scripts draw as their letters: each differs from the missing-glyph box."""

    def drawn(text: str) -> np.ndarray:
        canvas = Image.new("L", (40, 16), 0)
        ImageDraw.Draw(canvas).text((2, 1), text, fill=255, font=font())
        return np.asarray(canvas)

    box = drawn("\u0378")  # an unassigned code point: every font draws its missing-glyph box
    for letter in ("é", "ß", "Ж", "λ", "ł"):
        assert not np.array_equal(drawn(letter), box), letter


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbors_match_brute_force_across_chunks(k: int) -> None:
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(130, 16, generator=generator), torch.randn(70, 16, generator=generator)
    bank[5] = queries[3]  # an exact match: distance 0
    distances, indices = nearest_neighbors(queries, bank, k=k, chunk_size=32)
    expected, expected_index = torch.cdist(queries, bank).topk(k, dim=1, largest=False)
    torch.testing.assert_close(distances, expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(indices, expected_index) and indices[3, 0] == 5
    with pytest.raises(ValueError, match="exceeds the memory bank size"):
        nearest_neighbors(queries, bank[:2], k=3)


@pytest.mark.parametrize("k", [1, 3])
def test_batched_nearest_neighbors_search_each_query_set_in_its_own_bank(k: int) -> None:
    generator = torch.Generator().manual_seed(1)
    queries, banks = torch.randn(3, 40, 8, generator=generator), torch.randn(3, 70, 8, generator=generator)
    banks[1, 9] = queries[1, 4]  # an exact match in image 1's bank only
    distances, indices = batched_nearest_neighbors(queries, banks, k=k, chunk_size=32)
    for b in range(3):
        expected, expected_index = torch.cdist(queries[b], banks[b]).topk(k, dim=1, largest=False)
        torch.testing.assert_close(distances[b], expected, rtol=1e-4, atol=1e-3)
        assert torch.equal(indices[b], expected_index)
    assert indices[1, 4, 0] == 9 and distances[1, 4, 0] == 0 and distances[0, 4, 0] > 0


def test_padim_embedding_selects_the_same_channels_as_the_full_concatenation() -> None:
    model = PadimModel(BACKBONE, levels=[1, 2, 3], num_features=30, feature_seed=2).eval()
    images = torch.rand(2, 3, 64, 64)
    maps = list(model.feature_extractor(images).values())
    full = torch.cat([maps[0]] + [F.interpolate(m, size=maps[0].shape[-2:], mode="nearest") for m in maps[1:]], dim=1)
    assert torch.equal(model.embed(images), full.index_select(1, model.feature_index))


def test_padim_warns_when_few_images_fit_many_dimensions(caplog) -> None:
    module = Padim(backbone=BACKBONE, levels=[1, 2, 3], num_features=20)
    module.fit_model(torch.rand(30, 20, 4, 4))  # 30 images < 2 x 20 dimensions
    assert "PaDiM: 30 fitted images for 20-dimensional Gaussians" in caplog.text
    caplog.clear()
    module.fit_model(torch.rand(40, 20, 4, 4))
    assert "PaDiM" not in caplog.text


def test_patchcore_thins_its_bank_with_its_sampler() -> None:
    model = PatchcoreModel(BACKBONE, levels=[2, 3], embedding_dim=64, coreset_sampler=GreedyCoresetSampler(ratio=0.25, progress=False))
    embeddings = torch.rand(3, 8, 8, model.feature_dim)
    model.fit(embeddings)
    assert model.memory_bank.shape == (48, model.feature_dim)  # 25 % of 3 x 64 patches
    assert (model.fit_report["coreset_kept"], model.fit_report["coreset_of"]) == (48, 192)  # into metrics.json
    assert GreedyCoresetSampler(ratio=1.0)(torch.rand(10, 4)).tolist() == list(range(10))
    with pytest.raises(UserInputError, match=r"coreset_sampler.ratio=0: must be a number in \(0, 1\]"):
        GreedyCoresetSampler(ratio=0)
