"""Backbones: real offline ImageNet weights, local weight files, hub failure, feature levels."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components import FeatureExtractor, create_backbone
from anomalib_lite.models.components.feature_extractor import fold_batch_norms, load_classifier_state_dict

# ImageNet-1k: 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian cat.
CAT_CLASSES = {281, 282, 283, 284, 285}


def _chelsea(size: int) -> torch.Tensor:
    from skimage import data
    from skimage.transform import resize

    image = resize(data.chelsea(), (size, size), anti_aliasing=True)  # a real photo of a tabby cat
    return torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0)


@pytest.mark.parametrize(("name", "size"), [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite1", 240), ("tf_efficientnet_lite2", 260)])
def test_offline_weights_are_real_imagenet_weights(name: str, size: int) -> None:
    classifier = create_backbone(name, "offline").eval()
    with torch.no_grad():
        logits = classifier((_chelsea(size) - 0.5) / 0.5)
    top5 = set(logits.topk(5).indices[0].tolist())
    assert logits.argmax().item() in CAT_CLASSES, top5
    assert len(top5 & CAT_CLASSES) >= 2
    random_init = create_backbone(name, "none").eval()
    with torch.no_grad():
        assert not torch.allclose(random_init((_chelsea(size) - 0.5) / 0.5), logits)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_equals_offline_package(tmp_path, suffix: str) -> None:
    state = load_classifier_state_dict("tf_efficientnet_lite0", "offline")
    path = tmp_path / f"lite0{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    from_file = FeatureExtractor("tf_efficientnet_lite0", [2, 3], weights=str(path), mean=(0.5,) * 3, std=(0.5,) * 3)
    offline = FeatureExtractor("tf_efficientnet_lite0", [2, 3], weights="offline", mean=(0.5,) * 3, std=(0.5,) * 3)
    images = torch.rand(1, 3, 64, 64)
    for a, b in zip(from_file(images).values(), offline(images).values()):
        torch.testing.assert_close(a, b)


def test_feature_levels_strides_and_frozen() -> None:
    extractor = FeatureExtractor("tf_efficientnet_lite0", [1, 2, 3], weights="none")
    extractor.train()
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
    features = extractor(torch.rand(2, 3, 64, 64))
    assert {level: tuple(f.shape[-2:]) for level, f in features.items()} == {1: (16, 16), 2: (8, 8), 3: (4, 4)}
    assert extractor.channels == [24, 40, 112]


def test_missing_level_and_bad_weights_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserInputError, match="has no feature level 7"):
        FeatureExtractor("resnet18", [2, 7], weights="none", available_levels=[0, 1, 2, 3, 4])
    with pytest.raises(UserInputError, match="has no feature level 6"):
        FeatureExtractor("resnet18", [6], weights="none")  # caught from timm's feature info too
    with pytest.raises(UserInputError, match="weights file not found"):
        create_backbone("resnet18", str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserInputError, match="cannot read backbone weights"):
        create_backbone("resnet18", str(tmp_path / "junk.pth"))
    with pytest.raises(UserInputError, match="no offline weights for backbone 'resnet18'"):
        create_backbone("resnet18", "offline")


def test_hub_without_network_fails_with_one_helpful_line(monkeypatch) -> None:
    # Point the hub at an address nothing listens on: the same path as a machine without network.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UserInputError) as error:
        create_backbone("resnet18", "hub")
    message = str(error.value)
    assert "\n" not in message and "backbone.weights=/path/to/weights.pth" in message and "efficientnet_lite0" in message


def _with_batch_norm_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Random running statistics and affine parameters, so folding them is not the identity."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
            module.weight.data.copy_(1 + 0.3 * torch.randn(shape, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18", "wide_resnet50_2"])
def test_folding_batch_norms_keeps_the_features(name: str) -> None:
    """The extractor's folded, channels-last network computes the backbone's features."""
    reference = _with_batch_norm_statistics(create_backbone(name, "none", features_only=True, out_indices=(1, 2, 3)))
    folded = copy.deepcopy(reference)
    assert fold_batch_norms(folded) > 10
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    folded = folded.to(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for expected, result in zip(reference(images), folded(images.contiguous(memory_format=torch.channels_last))):
            torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_extractor_runs_the_folded_network() -> None:
    extractor = FeatureExtractor("resnet18", [2, 3], weights="none")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.modules())
    features = extractor(torch.rand(1, 3, 64, 64))
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features.values())
