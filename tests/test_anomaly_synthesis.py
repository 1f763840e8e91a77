"""The Perlin synthesiser (DRAEM's anomalies), its texture sources and augmenters."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from anomalib_lite.data.anomaly_sources import AUGMENTERS, ProceduralTextures, TextureFolder, augment_textures
from anomalib_lite.data.anomaly_synthesis import PerlinSynthesizer, blend_anomaly, perlin_mask, rotate_images
from anomalib_lite.data.perlin import perlin_noise
from anomalib_lite.data.samples import ImageResize, Sample
from anomalib_lite.data.synthetic import generate_category
from anomalib_lite.data.validation import SYNTHETIC_DEFECT_TYPE, ValidationSet
from anomalib_lite.errors import UserInputError


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _authors_perlin(shape: tuple[int, int], res: tuple[int, int], angles: np.ndarray) -> np.ndarray:
    """The DRAEM authors' tiled construction (rand_perlin_2d_np), with given gradient angles."""
    delta = (res[0] / shape[0], res[1] / shape[1])
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0 : res[0] : delta[0], 0 : res[1] : delta[1]].transpose(1, 2, 0) % 1
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tile(rows: slice, cols: slice) -> np.ndarray:
        return np.repeat(np.repeat(gradients[rows, cols], d[0], axis=0), d[1], axis=1)

    def dot(grad: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
        return ((grid[..., 0] + shift[0]) * grad[..., 0] + (grid[..., 1] + shift[1]) * grad[..., 1])

    n00 = dot(tile(slice(0, -1), slice(0, -1)), (0, 0))
    n10 = dot(tile(slice(1, None), slice(0, -1)), (-1, 0))
    n01 = dot(tile(slice(0, -1), slice(1, None)), (0, -1))
    n11 = dot(tile(slice(1, None), slice(1, None)), (-1, -1))
    t = 6 * grid**5 - 15 * grid**4 + 10 * grid**3
    lerp = lambda a, b, w: a + w * (b - a)  # noqa: E731
    return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])


def test_perlin_noise_is_the_authors_gradient_noise_and_seeded() -> None:
    noise = perlin_noise(64, 96, (4, 8), _generator(0))
    angles = 2 * math.pi * torch.rand(5, 9, generator=_generator(0), dtype=torch.float64).numpy()
    np.testing.assert_allclose(noise.numpy(), _authors_perlin((64, 96), (4, 8), angles), atol=1e-6)
    assert torch.equal(noise, perlin_noise(64, 96, (4, 8), _generator(0)))
    assert not torch.equal(noise, perlin_noise(64, 96, (4, 8), _generator(1)))
    # Zero at every lattice corner (gradient noise, not value noise or blurred random blobs).
    assert noise[::16, ::12].abs().max() < 1e-6
    assert perlin_noise(50, 70, (3, 5), _generator(0)).shape == (50, 70)  # sides need not divide


def test_perlin_masks_are_seeded_and_their_blobs_shrink_as_the_scale_grows() -> None:
    assert torch.equal(perlin_mask(64, 64, _generator(3)), perlin_mask(64, 64, _generator(3)))
    mean_areas = []
    for exponent in range(1, 5):
        areas = []
        for seed in range(12):
            mask = perlin_mask(128, 128, _generator(seed), (exponent, exponent), rotation=0).numpy()
            labels, count = ndimage.label(mask)
            areas += list(np.bincount(labels.ravel())[1:]) if count else []
        mean_areas.append(np.mean(areas))
    assert all(a > b for a, b in zip(mean_areas, mean_areas[1:])), mean_areas
    mask = perlin_mask(64, 64, _generator(0))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_blend_formula_on_a_hand_case() -> None:
    images = torch.full((1, 3, 2, 2), 0.2)
    textures = torch.full((1, 3, 2, 2), 0.8)
    masks = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    out = blend_anomaly(images, textures, masks, torch.tensor([0.25]))
    # Inside: 0.25 * 0.2 + 0.75 * 0.8 = 0.65; outside the image is untouched.
    expected = torch.tensor([[0.65, 0.2], [0.2, 0.2]]).expand(1, 3, 2, 2)
    torch.testing.assert_close(out, expected)


def test_perlin_synthesizer_blends_with_the_codes_and_the_papers_convention() -> None:
    images = torch.rand(6, 3, 32, 32, generator=_generator(0))
    textures = torch.rand(6, 3, 32, 32, generator=_generator(1))
    code = PerlinSynthesizer(anomaly_probability=1.0, beta=(0.3, 0.3), redraw_empty_masks=True, seed=0)
    out, masks, has_anomaly = code(images, textures)
    assert has_anomaly.all() and masks.flatten(1).sum(1).min() > 0
    inside = masks.bool().unsqueeze(1).expand_as(images)
    # Code: beta weights the image, 1 - beta the texture.
    torch.testing.assert_close(out[inside], (0.3 * images + 0.7 * textures)[inside])
    assert torch.equal(out[~inside], images[~inside])
    paper = PerlinSynthesizer(anomaly_probability=1.0, beta=(0.3, 0.3), blend="paper", redraw_empty_masks=True, seed=0)
    out, masks, _ = paper(images, textures)
    inside = masks.bool().unsqueeze(1).expand_as(images)
    torch.testing.assert_close(out[inside], (0.7 * images + 0.3 * textures)[inside])


def test_perlin_synthesizer_is_seeded_and_leaves_about_half_the_images_clean() -> None:
    images = torch.rand(64, 3, 32, 32, generator=_generator(0))
    first = PerlinSynthesizer(seed=5)(images)
    second = PerlinSynthesizer(seed=5)(images)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first.images, PerlinSynthesizer(seed=6)(images).images)
    clean = first.masks.flatten(1).sum(1) == 0
    assert torch.equal(first.images[clean], images[clean])  # a clean image is returned unchanged
    assert torch.equal(first.has_anomaly, ~clean)
    assert 20 <= int(first.has_anomaly.sum()) <= 44  # ~ Binomial(64, 0.5) (minus rare empty masks)
    assert float(first.images.min()) >= 0 and float(first.images.max()) <= 1
    none = PerlinSynthesizer(anomaly_probability=0.0, seed=0)(images)
    assert torch.equal(none.images, images) and not none.has_anomaly.any()
    with pytest.raises(ValueError, match="beta"):
        PerlinSynthesizer(beta=(0.5, 0.2))


def test_training_rotation_turns_about_thirty_percent_of_the_images() -> None:
    images = torch.rand(200, 1, 9, 9, generator=_generator(0))
    rotated = rotate_images(images, _generator(0), probability=0.3, degrees=90)
    changed = (rotated - images).flatten(1).abs().amax(1) > 1e-6
    assert 40 <= int(changed.sum()) <= 80
    assert torch.equal(rotate_images(images, _generator(0), probability=0.0), images)


def _write_textures(root: Path) -> list[Path]:
    paths = [root / "a" / "one.png", root / "b" / "two.jpg", root / "three.png"]
    for index, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.full((20, 30, 3), 40 * (index + 1), dtype=np.uint8)
        Image.fromarray(array).save(path)
    return paths


def test_texture_folder_draws_resized_images_from_any_folder(tmp_path: Path) -> None:
    _write_textures(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    source = TextureFolder(tmp_path)
    assert len(source) == 3 and "3 texture images" in source.describe()
    textures = source.draw(5, 16, 24, _generator(0))
    assert textures.shape == (5, 3, 16, 24)
    levels = {round(float(t.mean()) * 255) for t in textures}
    assert levels <= {40, 80, 120}  # every draw is one of the files (uniform colours)
    torch.testing.assert_close(source.load(0, 16, 24), source.load(0, 16, 24))  # cached = decoded
    with pytest.raises(UserInputError, match="does not exist"):
        TextureFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no images"):
        TextureFolder(tmp_path / "empty")


def test_procedural_textures_are_seeded_varied_and_in_range() -> None:
    source = ProceduralTextures()
    first = source.draw(6, 48, 40, _generator(0))
    assert first.shape == (6, 3, 48, 40) and float(first.min()) >= 0 and float(first.max()) <= 1
    assert torch.equal(first, source.draw(6, 48, 40, _generator(0)))
    assert all(not torch.equal(first[i], first[j]) for i in range(6) for j in range(i))
    assert float(first.std(dim=(2, 3)).mean()) > 0.02  # textures, not flat colours


def test_augmenters_keep_shape_and_range_and_three_are_applied() -> None:
    image = ProceduralTextures().draw(1, 32, 32, _generator(0))
    for name, augmenter in AUGMENTERS.items():
        out = augmenter(image, _generator(1))
        assert out.shape == image.shape and float(out.min()) >= -1e-6 and float(out.max()) <= 1 + 1e-6, name
    torch.testing.assert_close(AUGMENTERS["invert"](image, _generator(0)), 1 - image)
    batch = ProceduralTextures().draw(4, 32, 32, _generator(1))
    augmented = augment_textures(batch, _generator(2))
    assert torch.equal(augmented, augment_textures(batch, _generator(2)))
    assert not torch.equal(augmented, batch)
    assert torch.equal(augment_textures(batch, _generator(2), count=0), batch)


def test_validation_view_can_use_perlin_anomalies_and_each_has_one(tmp_path: Path) -> None:
    generate_category(tmp_path, "disc", image_size=32, num_train=4, num_test_good=1, num_test_per_defect=1)
    good = sorted((tmp_path / "disc" / "train" / "good").iterdir())
    samples = [Sample(path, 0, "good") for path in good]
    synthesis = {"_target_": "anomalib_lite.data.anomaly_synthesis.PerlinSynthesizer", "source": None}
    dataset = ValidationSet(samples, ImageResize(32), synthesis, seed=0)
    items = [dataset[i] for i in range(len(dataset))]
    synthetic = [item for item in items if item.label == 1]
    assert len(synthetic) == 4 and all(item.defect_type == SYNTHETIC_DEFECT_TYPE for item in synthetic)
    assert all(item.mask.sum() > 0 for item in synthetic)  # every synthetic image holds an anomaly
    assert torch.equal(dataset[1].image, ValidationSet(samples, ImageResize(32), synthesis, seed=0)[1].image)


def test_prune_regions_drops_small_and_off_foreground_regions() -> None:
    from anomalib_lite.data.anomaly_synthesis import prune_regions

    mask = torch.zeros(20, 20)
    mask[1:3, 1:3] = 1  # 4 pixels
    mask[10:16, 10:16] = 1  # 36 pixels
    mask[2:8, 14:18] = 1  # 24 pixels, off the foreground below
    assert torch.equal(prune_regions(mask, min_pixels=5), mask - _only(mask, 1, 3, 1, 3))
    foreground = torch.zeros(20, 20)
    foreground[15, 15] = 0.9  # touches the 36-pixel region only
    kept = prune_regions(mask, min_pixels=0, foreground=foreground)
    assert torch.equal(kept, _only(mask, 10, 16, 10, 16))


def _region(top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    region = torch.zeros(20, 20)
    region[top:bottom, left:right] = 1
    return region


def _only(mask: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    return mask * _region(top, bottom, left, right)


def test_shuffle_tiles_permutes_whole_tiles() -> None:
    from anomalib_lite.data.anomaly_synthesis import shuffle_tiles

    images = torch.rand(2, 3, 32, 48)
    shuffled = shuffle_tiles(images, 4, _generator(0))
    assert not torch.equal(shuffled, images)
    for image, output in zip(images, shuffled):
        tiles = {tuple(image[:, y : y + 8, x : x + 12].flatten().tolist()) for y in range(0, 32, 8) for x in range(0, 48, 12)}
        moved = {tuple(output[:, y : y + 8, x : x + 12].flatten().tolist()) for y in range(0, 32, 8) for x in range(0, 48, 12)}
        assert tiles == moved
    with pytest.raises(ValueError, match="divisible"):
        shuffle_tiles(torch.rand(1, 3, 30, 32), 4, _generator(0))


def test_perlin_synthesizer_keeps_regions_on_the_foreground_and_uses_structure_sources() -> None:
    images = torch.rand(6, 3, 64, 64)
    foreground = torch.zeros(6, 64, 64)
    foreground[:, 16:48, 16:48] = 1
    synthesizer = PerlinSynthesizer(anomaly_probability=1.0, structure_probability=1.0, min_region_fraction=0.001, seed=3)
    augmented, masks, has_anomaly = synthesizer(images, foreground=foreground)
    assert bool(has_anomaly.all())
    from scipy import ndimage

    for mask in masks:
        labels, count = ndimage.label(mask.numpy() > 0, structure=np.ones((3, 3)))
        for region in range(1, count + 1):
            pixels = torch.from_numpy(labels == region)
            assert int(pixels.sum()) >= math.ceil(0.001 * 64 * 64)
            assert bool(pixels[16:48, 16:48].any())
    # Outside the masks the images are untouched; inside, the anomaly is drawn from the image itself.
    outside = (masks == 0).unsqueeze(1).expand_as(images)
    assert torch.equal(augmented[outside], images[outside])
