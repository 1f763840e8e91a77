"""SPADE (Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences", 2020)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from anomalib_lite.models.components import (
    AnomalyOutput,
    FeatureExtractor,
    MemoryBankModel,
    ResizableBuffersMixin,
    batch_chunks,
    batched_nearest_neighbors,
    blur_anomaly_map,
    nearest_neighbors,
)
from anomalib_lite.schema import Levels, NonNegative, PositiveInt

PyramidMatching = Literal["concatenated", "per_level"]


class SpadeModel(ResizableBuffersMixin, MemoryBankModel):
    """Two-stage retrieval: the K nearest training images, then pixel correspondences among them.

    Image score: mean Euclidean distance of the image's globally pooled feature (`global_level`,
    average-pooled; the paper's ResNet avgpool output is level 4) to its K nearest training images'
    (`num_neighbors` = K, the paper's 50; all training images when there are fewer).
    Pixel score: each position's feature is compared with the feature-pyramid positions of those
    K images only (the gallery), never with the whole training set; the score is the mean distance
    to its `num_pixel_neighbors` (the paper's kappa, 1) nearest gallery features. The map is
    upsampled to the input size and blurred by a Gaussian of `blur_sigma` (4).

    `pyramid_matching`: the authors released no code.
      "concatenated" (default, the paper's text): levels `levels` (1-3) are bilinearly upsampled
          to the first level's grid and concatenated, one nearest neighbour per position.
      "per_level" (the widely used public port, byungjae89/SPADE-pytorch): the nearest neighbour is
          found in each level separately, at its own resolution; the distance maps are upsampled to
          the input size and averaged.
    The training images' levels are stored at their own resolution (less memory than the
    upsampled pyramid); the gallery is upsampled per test image.
    """

    resizable_buffers = ("global_bank", *(f"level_bank_{i}" for i in range(8)))

    def __init__(
        self,
        backbone: dict,
        levels: Levels = (1, 2, 3),
        global_level: int = 4,
        num_neighbors: PositiveInt = 50,
        num_pixel_neighbors: PositiveInt = 1,
        pyramid_matching: PyramidMatching = "concatenated",
        blur_sigma: Annotated[float, NonNegative] = 4.0,
        nn_chunk_size: PositiveInt = 2048,
    ) -> None:
        super().__init__()
        if pyramid_matching not in ("concatenated", "per_level"):
            raise ValueError(f"pyramid_matching must be 'concatenated' or 'per_level', got {pyramid_matching!r}")
        if len(levels) > 8:
            raise ValueError("SPADE takes at most 8 pyramid levels")
        self.levels = list(levels)
        self.global_level = global_level
        self.feature_extractor = FeatureExtractor(levels=sorted({*self.levels, global_level}), **backbone)
        self.num_neighbors = num_neighbors
        self.num_pixel_neighbors = num_pixel_neighbors
        self.pyramid_matching = pyramid_matching
        self.blur_sigma = blur_sigma
        self.nn_chunk_size = nn_chunk_size
        self.register_buffer("global_bank", torch.empty(0))  # N x C_global
        for i in range(len(self.levels)):
            self.register_buffer(f"level_bank_{i}", torch.empty(0))  # N x C_i x h_i x w_i

    def level_banks(self) -> list[torch.Tensor]:
        return [getattr(self, f"level_bank_{i}") for i in range(len(self.levels))]

    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """B x 3 x H x W -> {"global": B x C, "level_<i>": B x C_i x h_i x w_i for each pyramid level}."""
        features = self.feature_extractor(images)
        embedding = {"global": features[self.global_level].mean(dim=(2, 3))}
        for i, level in enumerate(self.levels):
            embedding[f"level_{i}"] = features[level].contiguous()
        return embedding

    @torch.no_grad()
    def fit(self, embeddings: dict[str, torch.Tensor]) -> None:
        """The memory: every training image's global feature and pyramid levels."""
        self.global_bank = embeddings["global"].contiguous()
        for i in range(len(self.levels)):
            setattr(self, f"level_bank_{i}", embeddings[f"level_{i}"].contiguous())

    def retrieve(self, global_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x C global features -> (B image scores, B x K indices of the nearest training images)."""
        k = min(self.num_neighbors, self.global_bank.shape[0])
        distances, indices = nearest_neighbors(global_features, self.global_bank, k=k, chunk_size=self.nn_chunk_size)
        return distances.mean(dim=1), indices

    def pixel_distances(self, queries: torch.Tensor, galleries: torch.Tensor) -> torch.Tensor:
        """B x C x h x w queries, B x K x C x h' x w' galleries -> B x h x w: each position's mean
        distance to the kappa nearest positions of its own image's gallery."""
        height, width = queries.shape[-2:]
        gallery_rows = galleries.permute(0, 1, 3, 4, 2).flatten(1, 3)
        query_rows = queries.permute(0, 2, 3, 1).flatten(1, 2)
        kappa = min(self.num_pixel_neighbors, gallery_rows.shape[1])
        distances, _ = batched_nearest_neighbors(query_rows, gallery_rows, k=kappa, chunk_size=self.nn_chunk_size)
        return distances.mean(dim=2).unflatten(1, (height, width))

    def pixel_map(self, queries: list[torch.Tensor], neighbours: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """The pyramid levels of B images and their B x K retrieved training images -> B x H x W."""
        galleries = [bank[neighbours] for bank in self.level_banks()]  # B x K x C_i x h_i x w_i
        if self.pyramid_matching == "concatenated":
            distance_maps = [self.pixel_distances(concatenate_levels(queries), concatenate_levels(galleries))]
        else:
            distance_maps = [self.pixel_distances(q, g) for q, g in zip(queries, galleries)]
        upsampled = [F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0] for m in distance_maps]
        return torch.stack(upsampled).mean(dim=0)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.global_bank.numel() == 0:
            raise RuntimeError("SPADE is not fitted: fit it before inference")
        embedding = self.embed(images)
        pred_score, neighbours = self.retrieve(embedding["global"])
        levels = [embedding[f"level_{i}"] for i in range(len(self.levels))]
        # One image at a time when run: its gallery of K upsampled pyramids is about 1 GB at 224 px
        # (Wide ResNet-50). Traced or exported, the whole batch at once (memory grows with it).
        chunks = zip(batch_chunks(neighbours, 1), *(batch_chunks(level, 1) for level in levels))
        maps = [self.pixel_map(list(queries), image_neighbours, images.shape[-2:]) for image_neighbours, *queries in chunks]
        anomaly_map = blur_anomaly_map(torch.cat(maps), self.blur_sigma)
        return AnomalyOutput(pred_score, anomaly_map)


def concatenate_levels(levels: list[torch.Tensor]) -> torch.Tensor:
    """[(...) x C_i x h_i x w_i] -> (...) x sum C_i x h_0 x w_0: bilinear upsampling to the first level's grid."""
    leading, size = levels[0].shape[:-3], levels[0].shape[-2:]
    maps = [level.flatten(0, -4) for level in levels]  # the leading axes as one
    maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
    return torch.cat(maps, dim=1).unflatten(0, leading)
