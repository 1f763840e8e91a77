"""The teacher-student methods' math: distances, map fusion, STFPM's and Reverse Distillation's
losses and maps on hand cases, and Reverse Distillation's networks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.distillation import (
    cosine_distance,
    cosine_similarity,
    flattened_cosine_distance,
    fuse_level_maps,
    normalized_squared_distance,
)
from anomalib_lite.models.reverse_distillation import ReverseDistillationModel
from anomalib_lite.models.stfpm import StfpmModel

RESNET18 = {"name": "resnet18", "weights": "none"}
LITE0 = {"name": "tf_efficientnet_lite0", "weights": "none", "mean": [0.5] * 3, "std": [0.5] * 3}


def vectors(*rows: tuple[float, ...]) -> torch.Tensor:
    """Feature vectors -> 1 x C x 1 x N (one image, N positions in a row)."""
    return torch.tensor(rows, dtype=torch.float32).T.reshape(1, len(rows[0]), 1, len(rows))


def test_distances_on_hand_cases() -> None:
    teacher, student = vectors((3.0, 4.0), (1.0, 0.0)), vectors((1.0, 0.0), (-2.0, 0.0))
    # (0.6, 0.8) against (1, 0): 0.4^2 + 0.8^2 = 0.8 = 2 - 2 cos; opposite directions: 4.
    assert normalized_squared_distance(teacher, student).flatten().tolist() == pytest.approx([0.8, 4.0])
    assert cosine_distance(teacher, student).flatten().tolist() == pytest.approx([0.4, 2.0])
    # Scale does not matter to either.
    assert torch.allclose(normalized_squared_distance(5 * teacher, student), normalized_squared_distance(teacher, student))


def test_flattened_cosine_differs_from_the_per_position_mean() -> None:
    encoded, decoded = vectors((1.0, 0.0), (1.0, 0.0)), vectors((2.0, 0.0), (0.0, 1.0))
    assert float(cosine_distance(encoded, decoded).mean()) == pytest.approx(0.5)  # (0 + 1) / 2
    # One vector per image: (1, 0, 1, 0) . (2, 0, 0, 1) = 2, norms sqrt 2 and sqrt 5.
    assert float(flattened_cosine_distance(encoded, decoded)) == pytest.approx(1 - 2 / math.sqrt(10))


def test_level_maps_are_multiplied_or_added_at_the_image_size() -> None:
    fine, coarse = torch.full((2, 4, 4), 3.0), torch.full((2, 2, 2), 0.5)
    assert torch.allclose(fuse_level_maps([fine, coarse], (8, 8), "product"), torch.full((2, 8, 8), 1.5))
    assert torch.allclose(fuse_level_maps([fine, coarse], (8, 8), "sum", align_corners=True), torch.full((2, 8, 8), 3.5))
    # A single hot position stays where it was (bilinear upsampling by an integer factor).
    hot = torch.zeros(1, 4, 4)
    hot[0, 1, 2] = 1
    fused = fuse_level_maps([hot], (16, 16), "sum")
    assert divmod(int(fused.flatten().argmax()), 16) in {(row, col) for row in (5, 6) for col in (9, 10)}


class FixedFeatures(nn.Module):
    """Stands in for a network: the same feature maps for any input batch."""

    def __init__(self, features: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.features = features

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        return {level: feature.expand(len(images), -1, -1, -1) for level, feature in self.features.items()}


@pytest.mark.parametrize("loss_factor", [1.0, 0.5])
def test_stfpm_loss_and_map_on_a_hand_case(loss_factor: float) -> None:
    model = StfpmModel(RESNET18, levels=(1, 2), loss_factor=loss_factor)
    # Level 1 (2 x 2): orthogonal at one position of four (distance 2), equal elsewhere.
    # Level 2 (1 x 1): at 60 degrees everywhere (distance 2 - 2 cos = 1).
    teacher1, student1 = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    teacher1[:, 0], student1[:, 0] = 1, 1
    student1[0, :, 0, 0] = torch.tensor([0.0, 1.0])
    teacher2, student2 = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), torch.tensor([0.5, math.sqrt(3) / 2]).view(1, 2, 1, 1)
    model.teacher, model.student = FixedFeatures({1: teacher1, 2: teacher2}), FixedFeatures({1: student1, 2: student2})
    images = torch.rand(3, 3, 8, 8)
    # Per level: mean over images and positions of the summed squared differences; levels added.
    assert float(model.loss(images)) == pytest.approx(loss_factor * (2 / 4 + 1))
    output = model(images)
    # Product of the levels: level 2 is 1 everywhere, so the map is level 1's upsampled to 8 x 8.
    expected = fuse_level_maps([torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])], (8, 8), "sum")
    assert torch.allclose(output.anomaly_map, expected.expand(3, -1, -1))
    assert torch.allclose(output.pred_score, expected.amax().expand(3))


def test_stfpm_student_is_the_teachers_architecture_untrained_and_trainable() -> None:
    torch.manual_seed(0)
    model = StfpmModel({**LITE0, "weights": "offline"})
    teacher = dict(model.teacher.backbone.named_parameters())
    assert model.student.channels == model.teacher.channels
    assert all(p.requires_grad for p in model.student.parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())
    # The student does not start from the teacher's weights.
    first = next(name for name in teacher if name.endswith("conv_stem.weight"))
    assert not torch.allclose(dict(model.student.backbone.named_parameters())[first], teacher[first])
    model.train()
    assert model.student.training and not model.teacher.training


def test_reverse_distillation_loss_variants_on_a_hand_case() -> None:
    model = ReverseDistillationModel(RESNET18, levels=(1, 2, 3), decoder_blocks=(1, 1, 1), bottleneck_blocks=1)
    encoded, decoded = vectors((1.0, 0.0), (1.0, 0.0)), vectors((2.0, 0.0), (0.0, 1.0))
    model.features = lambda images: ([encoded, encoded], [decoded, encoded])  # second level reproduced exactly
    images = torch.rand(1, 3, 8, 8)
    assert float(model.loss(images)) == pytest.approx(1 - 2 / math.sqrt(10))  # the authors' code: whole maps
    model.loss_kind = "per_position"
    assert float(model.loss(images)) == pytest.approx(0.5)  # the paper's equation 2


@pytest.mark.parametrize(("backbone", "channels", "relu"), [(RESNET18, [64, 128, 256], True), (LITE0, [24, 40, 112], False)])
@pytest.mark.parametrize(("size", "block"), [(64, "bottleneck"), (72, "basic")])
def test_reverse_distillation_decoder_mirrors_the_encoder(backbone: dict, channels: list[int], relu: bool, size: int, block: str) -> None:
    torch.manual_seed(0)
    model = ReverseDistillationModel(backbone, levels=(1, 2, 3), bottleneck_blocks=2, decoder_blocks=(1, 2, 3), block=block).eval()
    assert model.bottleneck.out_channels == 2 * channels[-1]
    assert [len(stage) for stage in model.decoder] == [1, 2, 3]
    images = torch.rand(2, 3, size, size)
    encoded, decoded = model.features(images)
    assert [e.shape for e in encoded] == [d.shape for d in decoded]
    assert [e.shape[1] for e in encoded] == channels
    # Post-ReLU encoder features (ResNet) are matched by a decoder ending in ReLU; EfficientNet's are not.
    assert all(bool((d >= 0).all()) for d in decoded) is relu
    output = model(images)
    assert output.anomaly_map.shape == (2, size, size) and output.pred_score.shape == (2,)


def test_reverse_distillation_checks_its_levels() -> None:
    with pytest.raises(UserInputError, match="consecutive levels"):
        ReverseDistillationModel(RESNET18, levels=(1, 3))
    with pytest.raises(UserInputError, match="one per level"):
        ReverseDistillationModel(RESNET18, levels=(1, 2, 3), decoder_blocks=(3, 4))


@pytest.mark.parametrize(("shape", "dim"), [((3, 16, 7, 5), 1), ((4, 300), 1)])
def test_cosine_similarity_is_torchs_bit_for_bit(shape: tuple[int, ...], dim: int) -> None:
    """Written out for OpenVINO (no rule for aten::cosine_similarity): the same values, not close ones."""
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    first[0] = 0  # a zero vector: the eps clamp, as torch's
    assert torch.equal(cosine_similarity(first, second, dim=dim), torch.nn.functional.cosine_similarity(first, second, dim=dim))
