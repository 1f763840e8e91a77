"""Pieces shared by the teacher-student methods: per-position distances between two feature
pyramids, and their fusion into one map at the image's resolution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F


def normalized_squared_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """B x C x h x w twice -> B x h x w: squared L2 distance of the channel-normalised feature
    vectors at every position (equals 2 - 2 cos; 0 where they point the same way)."""
    return (F.normalize(teacher, dim=1) - F.normalize(student, dim=1)).pow(2).sum(dim=1)


def cosine_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """B x C x h x w twice -> B x h x w: 1 - cosine similarity of the feature vectors at every position."""
    return 1 - cosine_similarity(teacher, student, dim=1)


def flattened_cosine_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """B x C x h x w twice -> B: 1 - cosine similarity of each image's whole feature map as one vector."""
    return 1 - cosine_similarity(teacher.flatten(1), student.flatten(1), dim=1)


def cosine_similarity(first: torch.Tensor, second: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """`F.cosine_similarity`, written out with torch's own operations (bit for bit its values):
    OpenVINO has no conversion rule for `aten::cosine_similarity`."""
    first_norm = torch.linalg.vector_norm(first, 2, dim=dim, keepdim=True).clamp_min(eps)
    second_norm = torch.linalg.vector_norm(second, 2, dim=dim, keepdim=True).clamp_min(eps)
    return ((first / first_norm) * (second / second_norm)).sum(dim)


def fuse_level_maps(
    maps: Sequence[torch.Tensor],
    size: tuple[int, int],
    reduce: Literal["product", "sum"],
    align_corners: bool = False,
) -> torch.Tensor:
    """B x h_l x w_l maps of several levels -> one B x H x W map: each upsampled (bilinear) to
    `size`, then multiplied or added."""
    fused = None
    for level_map in maps:
        upsampled = F.interpolate(level_map.unsqueeze(1), size=size, mode="bilinear", align_corners=align_corners)
        fused = upsampled if fused is None else fused * upsampled if reduce == "product" else fused + upsampled
    if fused is None:
        raise ValueError("no maps to fuse")
    return fused.squeeze(1)
