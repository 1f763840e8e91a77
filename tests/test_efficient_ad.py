"""EfficientAD's pieces: network shapes, the exact quantile, the teacher standardisation, the map
calibration on held-out normal images, the hard-feature loss, and the cached teacher artefact."""

from __future__ import annotations

import pytest
import torch
from conftest import Payload
from torch import nn

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.teacher_artefact import (
    artefact_path,
    folder_fingerprint,
    load_or_build,
    load_pretrained,
    time_to_go,
)
from anomalib_lite.models.efficient_ad import EfficientAdModel
from anomalib_lite.models.efficient_ad.teacher import BackboneDescriptor
from anomalib_lite.models.efficient_ad.torch_model import (
    AutoEncoder,
    patch_description_network,
    pdn_output_size,
    quantile,
)


@pytest.mark.parametrize("size", [64, 96, 256])
@pytest.mark.parametrize("model_size", ["small", "medium"])
def test_pdn_and_autoencoder_meet_on_one_grid(size: int, model_size: str) -> None:
    images = torch.rand(1, 3, size, size)
    teacher = patch_description_network(384, model_size)
    grid = pdn_output_size((size, size))
    assert teacher(images).shape == (1, 384, *grid)
    assert AutoEncoder(384, (size, size))(images).shape == (1, 384, *grid)
    # Padded (for distillation), the grid is a quarter of the input.
    assert patch_description_network(384, model_size, padding=True)(images).shape == (1, 384, size // 4, size // 4)


def test_the_authors_sizes_at_256() -> None:
    assert pdn_output_size((256, 256)) == (56, 56)
    autoencoder = AutoEncoder(384, (256, 256))
    assert autoencoder.grids == [(3, 3), (8, 8), (15, 15), (32, 32), (63, 63), (127, 127)]
    assert autoencoder.encoder(torch.rand(1, 3, 256, 256)).shape == (1, 64, 1, 1)  # the 64-dim bottleneck


def test_sizes_it_cannot_take_are_refused() -> None:
    with pytest.raises(UserInputError, match="divisible by 32"):
        EfficientAdModel(image_size=100)
    with pytest.raises(UserInputError, match="small' or 'medium"):
        EfficientAdModel(image_size=64, model_size="large")


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.995, 0.999, 1.0])
def test_quantile_equals_torch_quantile(q: float) -> None:
    values = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(quantile(values, q), torch.quantile(values, q))


def test_teacher_standardisation_is_the_mean_and_std_over_all_training_pixels() -> None:
    model = EfficientAdModel(image_size=64)
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model.prepare(torch.cat([model.preparation_statistics(images[:2]), model.preparation_statistics(images[2:])]))
    raw = model.teacher(model.normalize(images)).transpose(0, 1).flatten(1)  # C x (all pixels)
    assert torch.allclose(model.teacher_mean.flatten(), raw.mean(dim=1), atol=1e-5)
    assert torch.allclose(model.teacher_std.flatten(), raw.std(dim=1, unbiased=False), rtol=1e-4)
    standardised = model.teacher_features(model.normalize(images)).transpose(0, 1).flatten(1)
    assert torch.allclose(standardised.mean(dim=1), torch.zeros(384), atol=1e-4)


def test_calibration_maps_the_validation_quantiles_to_0_and_0_1() -> None:
    model = EfficientAdModel(image_size=64).eval()
    validation = model.calibration_maps(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    model.calibrate(validation)
    calibrated = model.calibrated(validation)
    for k in range(2):  # the student-teacher and the autoencoder map, each on its own scale
        assert float(quantile(calibrated[:, k], 0.9)) == pytest.approx(0.0, abs=1e-6)
        assert float(quantile(calibrated[:, k], 0.995)) == pytest.approx(0.1, rel=1e-4)
    images = torch.rand(2, 3, 64, 64)
    output = model(images)
    assert output.anomaly_map.shape == (2, 64, 64)
    assert torch.equal(output.pred_score, output.anomaly_map.flatten(1).amax(1))
    # The frame no patch is centred on: 0 after calibration (authors' code), or the lowest score.
    assert float(output.anomaly_map[:, 0, 0].abs().max()) == 0
    model.pad_calibrated = False
    framed = model(images).anomaly_map
    assert torch.all(framed[:, 0, 0] <= framed.flatten(1).amin(1) + 1e-6)


def test_hard_feature_loss_keeps_the_top_tenth_of_a_percent() -> None:
    model = EfficientAdModel(image_size=64, hard_quantile=0.999)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    terms = model.training_terms(images, images)
    normalized = model.normalize(images)
    distance = (model.teacher_features(normalized) - model.student(normalized)[:, :384]).pow(2).flatten()
    top = distance.topk(max(1, round(0.001 * distance.numel()))).values
    assert float(terms["hard"]) == pytest.approx(float(top.mean()), rel=0.05)
    assert float(terms["hard"]) > 3 * float(distance.mean())
    assert "penalty" not in terms
    assert "penalty" in model.training_terms(images, images, torch.rand(2, 3, 64, 64))
    # Only the student and the autoencoder learn.
    terms["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters())


def test_backbone_descriptor_is_on_the_finer_level_grid() -> None:
    backbone = {"name": "tf_efficientnet_lite0", "weights": "none", "mean": [0.5] * 3, "std": [0.5] * 3}
    descriptor = BackboneDescriptor(backbone, levels=(2, 3), out_channels=384)
    assert descriptor(torch.rand(2, 3, 128, 128)).shape == (2, 384, 16, 16)  # stride 8


def test_teacher_artefact_is_reused_for_the_same_inputs_and_rebuilt_when_they_change(tmp_path) -> None:
    builds = []

    def build(network: nn.Module) -> dict:
        builds.append(1)
        nn.init.normal_(network.weight)
        return {"steps": 1}

    first = nn.Linear(3, 2)
    inputs = {"steps": 10, "images": None}
    path = load_or_build(first, tmp_path, "teacher", inputs, build)
    assert path.is_file() and len(builds) == 1
    second = nn.Linear(3, 2)
    assert load_or_build(second, tmp_path, "teacher", dict(inputs), build) == path
    assert len(builds) == 1 and torch.equal(first.weight, second.weight)  # reused, not retrained
    changed = load_or_build(nn.Linear(3, 2), tmp_path, "teacher", {**inputs, "steps": 11}, build)
    assert changed != path and len(builds) == 2
    assert not list(tmp_path.glob("*.partial"))


def test_image_folder_changes_change_the_artefact(tmp_path) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    before = folder_fingerprint(folder)
    assert folder_fingerprint(folder) == before
    Image.new("RGB", (8, 8), color=(9, 9, 9)).save(folder / "b.png")
    after = folder_fingerprint(folder)
    assert after != before
    assert artefact_path(tmp_path, "t", {"images_fingerprint": before}) != artefact_path(tmp_path, "t", {"images_fingerprint": after})


def test_a_published_teacher_loads_from_a_file_or_a_url_by_its_own_names(tmp_path) -> None:  # noqa: ANN001
    """`method.teacher.pretrained`: a state dict under our names, or another code base's names with the
    same shapes in order (matched in order), from a file or a URL (downloaded once); never code."""
    published = patch_description_network(384, "small")
    torch.nn.init.normal_(published[0].weight)
    theirs = {f"conv{i}.{kind}": tensor for i, (kind, tensor) in enumerate(
        ((name.split(".")[-1], tensor) for name, tensor in published.state_dict().items()), start=1)}
    torch.save(theirs, tmp_path / "teacher_small.pth")
    torch.save({"state_dict": published.state_dict()}, tmp_path / "ours.pth")
    for source in (str(tmp_path / "teacher_small.pth"), str(tmp_path / "ours.pth"), (tmp_path / "ours.pth").as_uri()):
        teacher = patch_description_network(384, "small")
        load_pretrained(teacher, source, tmp_path / "cache", "method.teacher.pretrained")
        assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), published.state_dict().values()))
    assert (tmp_path / "cache" / "downloads" / "ours.pth").is_file()
    with pytest.raises(UserInputError, match="does not fit this teacher"):
        load_pretrained(patch_description_network(384, "medium"), str(tmp_path / "teacher_small.pth"), tmp_path, "method.teacher.pretrained")
    torch.save({"x": Payload(tmp_path / "ran")}, tmp_path / "evil.pth")
    with pytest.raises(UserInputError, match="refused to load method.teacher.pretrained: .*evil.pth: it needs code to be read"):
        load_pretrained(patch_description_network(384, "small"), str(tmp_path / "evil.pth"), tmp_path, "method.teacher.pretrained")
    assert not (tmp_path / "ran").exists()
    with pytest.raises(UserInputError, match="no such file"):
        load_pretrained(patch_description_network(384, "small"), str(tmp_path / "none.pth"), tmp_path, "method.teacher.pretrained")


def test_a_long_one_off_build_says_what_it_is_and_the_cheaper_option(tmp_path, caplog) -> None:  # noqa: ANN001
    network = nn.Linear(2, 2)
    with caplog.at_level("INFO"):
        load_or_build(network, tmp_path, "teacher", {"steps": 3}, lambda net: {"steps": 3}, cheaper="try method.teacher.steps=N")
    built = [r.getMessage() for r in caplog.records if "one-off build" in r.getMessage()]
    assert len(built) == 1 and "cached for every later run" in built[0] and "try method.teacher.steps=N" in built[0]
    assert time_to_go(10, 100, 5.0) == "about 45 s to go"
    assert time_to_go(100, 60000, 300.0) == "about 49.9 h to go"
    assert time_to_go(30, 100, 60.0) == "about 2 min to go"
