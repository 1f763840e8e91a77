"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Annotated, Literal, get_args

import torch
import torch.nn.functional as F

from anomalib_lite.models.components import (
    AnomalyOutput,
    FeatureExtractor,
    MemoryBankModel,
    ResizableBuffersMixin,
    nearest_neighbors,
    smooth_anomaly_map,
)
from anomalib_lite.schema import Levels, NonNegative, PositiveInt

log = logging.getLogger(__name__)

# How the concatenated levels become the patch vector (PatchcoreModel's docstring).
Embedding = Literal["per_level", "pooled", "concatenation"]


def pooling_projection(channels: Sequence[int], embedding_dim: int, per_level: bool = True) -> torch.Tensor:
    """The adaptive-average-pooling projection of the concatenated levels, as a (sum C) x D matrix.

    per_level=True (the PatchCore authors' code): each level's vector is first pooled to D, so
    every level weighs the same, then the stacked levels are pooled to D.
    per_level=False: the concatenated vector is pooled to D in one go (levels weigh by channel count).
    Pooling is linear, so applying it to the unit vectors gives its matrix.
    """
    def pool(matrix: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool1d(matrix.unsqueeze(1), embedding_dim).squeeze(1)

    if not per_level:
        return pool(torch.eye(sum(channels)))
    blocks = []
    for level, num_channels in enumerate(channels):
        block = torch.zeros(num_channels, len(channels) * embedding_dim)
        block[:, level * embedding_dim : (level + 1) * embedding_dim] = pool(torch.eye(num_channels))
        blocks.append(block)
    return pool(torch.cat(blocks))


def distance_preserving_projection(projection: torch.Tensor) -> torch.Tensor:
    """A C x min(C, D) matrix giving the same Euclidean distances as the C x D `projection`.

    When D > C (small backbones: 152 channels pooled to 1024) the pooled vectors only repeat
    channels; with P P^T = L L^T (Cholesky), |(x - y) L| = |(x - y) P| for all x, y, so the bank
    and the nearest-neighbour search work in C dimensions with identical distances.
    """
    num_channels, dim = projection.shape
    if dim <= num_channels:
        return projection
    gram = (projection.double() @ projection.double().T)
    return torch.linalg.cholesky(gram).float()


class PatchcoreModel(ResizableBuffersMixin, MemoryBankModel):
    """Locally aware patch features, a memory bank, nearest-neighbour patch scores.

    Patch features: each level is averaged over a `patch_size` x `patch_size` neighbourhood,
    deeper levels are bilinearly upsampled to the first level's resolution and concatenated;
    `embedding` says how the concatenation becomes the patch vector:
    - "per_level" (default, the authors' code): each level adaptive-average-pooled
      to `embedding_dim`, then the stack pooled to `embedding_dim`, so every level weighs the same;
    - "pooled": the concatenation pooled to `embedding_dim` in one go (levels weigh by channels);
    - "concatenation": the plain concatenation, no pooling (anomalib's embedding; levels weigh by
      channel count exactly). On a small backbone at a 1 % coreset this is the better one on
      magnetic_tile and the worse one on bottle; the held-out validation tells them apart
      (`hparams_search=patchcore_embedding`, experiments/CORESET_GAP.md).
    Pooling is applied in its distance-preserving form (`distance_preserving_projection`).
    The memory bank is every training patch, thinned by `coreset_sampler` (indices of the rows to
    keep; e.g. `GreedyCoresetSampler`), which is part of the method as in the authors' code.

    Image score: `num_neighbors=1` (default) takes the largest patch score, as the authors' code
    does; `num_neighbors=b > 1` applies the paper's reweighting (eq. 7) over the b nearest bank
    entries of the most anomalous patch's neighbour (`reweighted_image_score`), which the
    authors' code does not implement.
    """

    resizable_buffers = ("memory_bank",)

    def __init__(
        self,
        backbone: dict,
        levels: Levels = (2, 3),
        embedding: Embedding = "per_level",
        embedding_dim: PositiveInt | None = 1024,
        pool_per_level: bool | None = None,
        patch_size: PositiveInt = 3,
        num_neighbors: PositiveInt = 1,
        blur_sigma: Annotated[float, NonNegative] = 4.0,
        nn_chunk_size: PositiveInt = 2048,
        coreset_sampler: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.feature_extractor = FeatureExtractor(levels=levels, **backbone)
        self.embedding_dim = embedding_dim
        self.patch_size = patch_size
        self.num_neighbors = num_neighbors
        self.blur_sigma = blur_sigma
        self.nn_chunk_size = nn_chunk_size
        self.coreset_sampler = coreset_sampler
        channels = self.feature_extractor.channels
        # Checkpoints written before `embedding` existed said it with these two.
        if pool_per_level is not None:
            embedding = "per_level" if pool_per_level else "pooled"
        if embedding_dim is None:
            embedding = "concatenation"
        if embedding not in get_args(Embedding):
            raise ValueError(f"embedding must be one of {get_args(Embedding)}, got {embedding!r}")
        self.embedding = embedding
        # The concatenation needs no projection: no identity product on every batch.
        projection = None
        if embedding != "concatenation":
            per_level = embedding == "per_level"
            projection = distance_preserving_projection(pooling_projection(channels, embedding_dim, per_level))
        self.register_buffer("projection", projection, persistent=False)
        self.feature_dim = sum(channels) if projection is None else projection.shape[1]
        self.register_buffer("memory_bank", torch.empty(0, self.feature_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W images -> B x h x w x feature_dim patch features."""
        features = self.aggregate(self.feature_extractor(images))
        return features if self.projection is None else features @ self.projection

    def aggregate(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """Locally aware features before projection: B x h x w x (sum of channels)."""
        maps = [F.avg_pool2d(f, self.patch_size, stride=1, padding=self.patch_size // 2) for f in features.values()]
        size = maps[0].shape[-2:]
        maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        return torch.cat(maps, dim=1).permute(0, 2, 3, 1)

    def fit(self, embeddings: torch.Tensor) -> None:
        """Memory bank = every training patch, thinned by the coreset sampler (if any)."""
        bank = embeddings.reshape(-1, self.feature_dim)
        if self.coreset_sampler is not None:
            bank = bank[self.coreset_sampler(bank).to(bank.device)]
            self.fit_report = dict(getattr(self.coreset_sampler, "report", {}))
        else:
            log.info("PatchCore without a coreset sampler: the memory bank keeps all %d patches", bank.shape[0])
        self.memory_bank = bank.contiguous()

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("PatchCore has an empty memory bank: fit it before inference")
        embedding = self.embed(images)
        batch, h, w, _ = embedding.shape
        embedding = embedding.reshape(batch, h * w, self.feature_dim)
        num_patches = h * w
        distances, nn_index = nearest_neighbors(
            embedding.reshape(-1, self.feature_dim), self.memory_bank, k=1, chunk_size=self.nn_chunk_size
        )
        patch_scores = distances.view(batch, num_patches)
        nn_index = nn_index.view(batch, num_patches)
        pred_score = self.reweighted_image_score(embedding, patch_scores, nn_index)
        anomaly_map = smooth_anomaly_map(patch_scores.view(batch, h, w), images.shape[-2:], self.blur_sigma)
        return AnomalyOutput(pred_score, anomaly_map)

    def reweighted_image_score(
        self, embedding: torch.Tensor, patch_scores: torch.Tensor, nn_index: torch.Tensor
    ) -> torch.Tensor:
        """Paper eq. 7: s = (1 - exp|m_test* - m*| / sum_{m in N_b(m*)} exp|m_test* - m|) * s*.

        m_test* is the image's most anomalous patch, m* its nearest bank entry, N_b(m*) the b
        nearest bank entries of m* (m* itself first). Widely spread neighbourhoods (rare normal
        patterns) lower the score; a patch far from a dense normal cluster keeps it.
        """
        max_score, max_patch = patch_scores.max(dim=1)
        batch_index = torch.arange(embedding.shape[0], device=embedding.device)
        test_patch = embedding[batch_index, max_patch]  # B x D
        nearest = self.memory_bank[nn_index[batch_index, max_patch]]  # B x D
        k = min(self.num_neighbors, self.memory_bank.shape[0])
        if k <= 1:
            return max_score
        _, support = nearest_neighbors(nearest, self.memory_bank, k=k, chunk_size=self.nn_chunk_size)
        support_distances = torch.linalg.vector_norm(test_patch.unsqueeze(1) - self.memory_bank[support], dim=2)
        support_distances[:, 0] = max_score  # the first neighbour of m* is m* itself
        weights = 1 - torch.softmax(support_distances, dim=1)[:, 0]
        return weights * max_score
