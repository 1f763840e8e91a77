"""Patch SVDD (Yi & Yoon, "Patch SVDD: Patch-level SVDD for Anomaly Detection and Segmentation", ACCV 2020)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.models.components import (
    AnomalyOutput,
    FittedOnEmbeddings,
    PreparedOnTrainingImages,
    ResizableBuffersMixin,
    TrainableModel,
    average_over_patches,
    nearest_neighbors,
)
from anomalib_lite.schema import NonNegative, PositiveInt

# The 8 relative positions of the self-supervised task, as (row, column) directions; the class
# index is the position in this list (the authors' order).
DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
ClassifierHead = Literal["fixed_normalized", "linear"]


class SmallPatchEncoder(nn.Module):
    """The 32 px encoder: 8 conv3 layers without padding (the first of stride 2), LeakyReLU 0.1, tanh.

    Fully convolutional: on a 32 x 32 patch it gives one D-vector; on a whole image, the vectors
    of every 32 px patch at even offsets (output (i, j) = the patch at (2i, 2j)).
    """

    def __init__(self, feature_dim: int = 64) -> None:
        super().__init__()
        channels = (3, 32, 64, 128, 128, 64, 32, 32, feature_dim)
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=2 if i == 0 else 1) for i, (c_in, c_out) in enumerate(zip(channels, channels[1:]))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs[:-1]:
            x = F.leaky_relu(conv(x), 0.1)
        return torch.tanh(self.convs[-1](x))


class HierarchicalPatchEncoder(nn.Module):
    """The 64 px encoder: the 32 px encoder on the patch's four quarters, their 2 x 2 grid of
    vectors through conv2 (-> 128, LeakyReLU 0.1) and conv1 (-> D, tanh).

    The quarters' vectors are the small encoder's dense outputs 16 apart (32 px at stride 2), so the
    2 x 2 convolution is a convolution of dilation 16 on the dense map: `dense_64` gives every 64 px
    patch at even offsets exactly as the quarter split would (tested).
    """

    def __init__(self, feature_dim: int = 64) -> None:
        super().__init__()
        self.small = SmallPatchEncoder(feature_dim)
        self.combine = nn.Conv2d(feature_dim, 128, 2, dilation=16)
        self.project = nn.Conv2d(128, feature_dim, 1)

    def dense_32(self, images: torch.Tensor) -> torch.Tensor:
        return self.small(images)

    def head(self, dense_32: torch.Tensor, dilation: int = 16) -> torch.Tensor:
        combined = F.conv2d(dense_32, self.combine.weight, self.combine.bias, dilation=dilation)
        return torch.tanh(self.project(F.leaky_relu(combined, 0.1)))

    def dense_64(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.small(images))

    def patch_64(self, patches: torch.Tensor) -> torch.Tensor:
        """N x 3 x 64 x 64 -> N x D: the four quarters through the small encoder (4 small passes
        instead of the dense pass's 17 x 17 positions; the same values)."""
        num = len(patches)
        quarters = patches.unfold(2, 32, 32).unfold(3, 32, 32)  # N x 3 x 2 x 2 x 32 x 32
        quarters = quarters.permute(0, 2, 3, 1, 4, 5).reshape(num * 4, 3, 32, 32)
        grid = self.small(quarters).view(num, 2, 2, -1).permute(0, 3, 1, 2)  # N x D x 2 x 2
        return self.head(grid, dilation=1).flatten(1)


class PositionClassifier(nn.Module):
    """The 8-way relative-position classifier on f(p1) - f(p2): MLP D -> 128 -> 128 -> 8, LeakyReLU 0.1.

    `head="fixed_normalized"` (authors' code): the last layer's weight is divided by its column
    norms without gradient, so only its bias learns; "linear": a plain trained layer (the paper's
    description of an MLP classifier).
    """

    def __init__(self, feature_dim: int = 64, head: ClassifierHead = "fixed_normalized") -> None:
        super().__init__()
        if head not in ("fixed_normalized", "linear"):
            raise ValueError(f"classifier_head must be 'fixed_normalized' or 'linear', got {head!r}")
        self.hidden = nn.Sequential(nn.Linear(feature_dim, 128), nn.LeakyReLU(0.1), nn.Linear(128, 128), nn.LeakyReLU(0.1))
        self.out = nn.Linear(128, len(DIRECTIONS))
        self.fixed_normalized = head == "fixed_normalized"

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden((first - second).flatten(1))
        weight = self.out.weight
        if self.fixed_normalized:
            weight = (weight / weight.norm(dim=0, keepdim=True)).detach()
        return F.linear(hidden, weight, self.out.bias)


def position_pair_offsets(
    num: int, patch_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(num x 2 offsets of the second patch, num class labels): direction of the drawn class times
    3K/4 + U{0, ..., K/4 - 1} per axis (the authors' draw)."""
    labels = torch.randint(len(DIRECTIONS), (num,), generator=generator)
    spread = torch.randint(max(patch_size // 4, 1), (num, 2), generator=generator)
    directions = torch.tensor(DIRECTIONS)[labels]
    return directions * (spread + 3 * patch_size // 4), labels


def jitter_offsets(num: int, patch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """num x 2 offsets in {-K/32, ..., K/32}^2 without (0, 0): the SVDD' pair is its patch moved slightly."""
    reach = max(patch_size // 32, 1)
    offsets = torch.randint(-reach, reach + 1, (num, 2), generator=generator)
    still = (offsets == 0).all(dim=1)
    while bool(still.any()):
        offsets[still] = torch.randint(-reach, reach + 1, (int(still.sum()), 2), generator=generator)
        still = (offsets == 0).all(dim=1)
    return offsets


def crop(images: torch.Tensor, which: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """N patches of size x size: images[which[n]] at top-left corners[n] (row, column)."""
    return torch.stack([images[i, :, y : y + size, x : x + size] for i, (y, x) in zip(which.tolist(), corners.tolist())])


def grid_offsets(size: int, patch_size: int, stride: int) -> list[int]:
    """Top-left offsets of the test patches along one side (the authors' regular grid)."""
    return list(range(0, size - patch_size + 1, stride))


class PatchSvddModel(ResizableBuffersMixin, TrainableModel, FittedOnEmbeddings, PreparedOnTrainingImages):
    """Hierarchical patch encoder trained by SSL + lambda SVDD'; patch scores by nearest training patch.

    Training (per sampled image, both K = 64 and K = 32):
      SSL_K: an 8-way classifier tells where a second patch lies relative to the first (offset
        3K/4 + U[0, K/4) per axis, clipped to the image); both patches get an RGB shift and pixel
        noise of std 0.02.
      SVDD'_K: mean L2 distance between a patch's and its jittered copy's (<= K/32 px) features.
      loss = SSL_64 + SSL_32 + lambda (SVDD'_64 + SVDD'_32).
    Inputs are the images minus the per-pixel mean training image (`prepare`), as in the authors' code.

    Test: every 64 px patch at `stride_64` (16) and 32 px patch at `stride_32` (4) is scored by the L2
    distance to its nearest training patch feature of the same size (the shared chunked search);
    each pixel takes the mean score of the patches covering it, the two maps are multiplied, and
    the image score is the map's maximum. Patch features come densely from one pass per image.
    """

    resizable_buffers = ("mean_image", "bank_64", "bank_32")

    def __init__(
        self,
        feature_dim: PositiveInt = 64,
        lambda_svdd: Annotated[float, NonNegative] = 1.0,
        stride_64: PositiveInt = 16,
        stride_32: PositiveInt = 4,
        rgb_shift_std: Annotated[float, NonNegative] = 0.02,
        noise_std: Annotated[float, NonNegative] = 0.02,
        classifier_head: ClassifierHead = "fixed_normalized",
        nn_chunk_size: PositiveInt = 2048,
    ) -> None:
        super().__init__()
        if stride_64 % 2 or stride_32 % 2:
            raise ValueError(f"stride_64 and stride_32 must be even (dense features are 2 px apart), got {stride_64}, {stride_32}")
        self.encoder = HierarchicalPatchEncoder(feature_dim)
        self.classifier_64 = PositionClassifier(feature_dim, classifier_head)
        self.classifier_32 = PositionClassifier(feature_dim, classifier_head)
        self.lambda_svdd = lambda_svdd
        self.strides = {64: stride_64, 32: stride_32}
        self.rgb_shift_std, self.noise_std = rgb_shift_std, noise_std
        self.nn_chunk_size = nn_chunk_size
        self.register_buffer("mean_image", torch.empty(0))  # 3 x H x W
        self.register_buffer("bank_64", torch.empty(0))  # M x D
        self.register_buffer("bank_32", torch.empty(0))

    # -- the class mean ----------------------------------------------------------------------------
    def preparation_statistics(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def prepare(self, statistics: torch.Tensor) -> None:
        self.mean_image = statistics.mean(dim=0).contiguous()

    def standardize(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean_image.numel() == 0:
            raise RuntimeError("Patch SVDD has no mean training image: prepare it on the training images first")
        if images.shape[1:] != self.mean_image.shape:
            raise ValueError(f"images of {tuple(images.shape[1:])} do not match the training images' {tuple(self.mean_image.shape)}")
        return images - self.mean_image

    # -- training ------------------------------------------------------------------------------------
    def encode(self, patches: torch.Tensor, size: int) -> torch.Tensor:
        """N x 3 x K x K standardised patches -> N x D."""
        return self.encoder.patch_64(patches) if size == 64 else self.encoder.dense_32(patches).flatten(1)

    def _perturb(self, patches: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        shift = torch.randn(len(patches), 3, 1, 1, generator=generator) * self.rgb_shift_std
        noise = torch.randn(patches.shape, generator=generator) * self.noise_std
        return patches + shift.to(patches.device) + noise.to(patches.device)

    def pair_terms(self, images: torch.Tensor, which: torch.Tensor, size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(SSL cross-entropy, SVDD' distance) at patch size K for one pair of each kind per entry of `which`."""
        height, width = images.shape[-2:]
        num = len(which)
        limit = torch.tensor([height - size, width - size])
        corners = torch.stack([torch.randint(int(lim) + 1, (2 * num,), generator=generator) for lim in limit], dim=1)
        ssl_first, svdd_first = corners[:num], corners[num:]
        offsets, labels = position_pair_offsets(num, size, generator)
        ssl_second = (ssl_first + offsets).clamp(min=torch.zeros(2, dtype=torch.long), max=limit)
        svdd_second = (svdd_first + jitter_offsets(num, size, generator)).clamp(min=torch.zeros(2, dtype=torch.long), max=limit)
        ssl_patches = self._perturb(crop(images, torch.cat([which, which]), torch.cat([ssl_first, ssl_second]), size), generator)
        svdd_patches = crop(images, torch.cat([which, which]), torch.cat([svdd_first, svdd_second]), size)
        features = self.encode(torch.cat([ssl_patches, svdd_patches]), size)
        ssl_a, ssl_b, svdd_a, svdd_b = features.split(num)
        classifier = self.classifier_64 if size == 64 else self.classifier_32
        ssl = F.cross_entropy(classifier(ssl_a, ssl_b), labels.to(images.device))
        svdd = (svdd_a - svdd_b).norm(dim=1).mean()
        return ssl, svdd

    def loss_terms(self, images: torch.Tensor, which: torch.Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The objective on pairs drawn from `images[which]` (default: one per image)."""
        images = self.standardize(images)
        which = torch.arange(len(images)) if which is None else which
        ssl_64, svdd_64 = self.pair_terms(images, which, 64, generator)
        ssl_32, svdd_32 = self.pair_terms(images, which, 32, generator)
        loss = ssl_64 + ssl_32 + self.lambda_svdd * (svdd_64 + svdd_32)
        return {"loss": loss, "ssl_64": ssl_64, "ssl_32": ssl_32, "svdd_64": svdd_64, "svdd_32": svdd_32}

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """The validation loss: the objective on one pair of each kind per image, drawn with a
        fixed seed so that epochs are compared on the same pairs."""
        return self.loss_terms(images, generator=torch.Generator().manual_seed(0))["loss"]

    # -- memory banks and inference ------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"k64": B x D x I64 x J64, "k32": B x D x I32 x J32}: features of the test grid's patches."""
        height, width = images.shape[-2:]
        if min(height, width) < 64:
            raise ValueError(f"Patch SVDD needs images of at least 64 x 64 px, got {height} x {width}")
        dense_32 = self.encoder.dense_32(self.standardize(images))  # patch (2i, 2j)
        dense_64 = self.encoder.head(dense_32)
        embedding = {}
        for size, dense in ((64, dense_64), (32, dense_32)):
            # Output (i, j) is the patch at (2i, 2j); an odd side leaves one more than the grid has.
            step, stride = self.strides[size] // 2, self.strides[size]
            rows, columns = len(grid_offsets(height, size, stride)), len(grid_offsets(width, size, stride))
            embedding[f"k{size}"] = dense[..., ::step, ::step][..., :rows, :columns].contiguous()
        return embedding

    def fit(self, embeddings: dict[str, torch.Tensor]) -> None:
        self.bank_64 = embeddings["k64"].permute(0, 2, 3, 1).flatten(0, 2).contiguous()
        self.bank_32 = embeddings["k32"].permute(0, 2, 3, 1).flatten(0, 2).contiguous()

    def scale_map(self, features: torch.Tensor, bank: torch.Tensor, size: int, image_size: tuple[int, int]) -> torch.Tensor:
        """B x D x I x J patch features -> B x H x W mean nearest-neighbour distance of the covering patches."""
        batch, dim, rows, columns = features.shape
        distances, _ = nearest_neighbors(features.permute(0, 2, 3, 1).reshape(-1, dim), bank, k=1, chunk_size=self.nn_chunk_size)
        stride = self.strides[size]
        return average_over_patches(
            distances.view(batch, rows, columns), image_size, size,
            grid_offsets(image_size[0], size, stride), grid_offsets(image_size[1], size, stride),
        )

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.bank_64.numel() == 0:
            raise RuntimeError("Patch SVDD has no memory bank: fit it on the training images first")
        embedding = self.embed(images)
        image_size = images.shape[-2:]
        anomaly_map = self.scale_map(embedding["k64"], self.bank_64, 64, image_size) * self.scale_map(
            embedding["k32"], self.bank_32, 32, image_size
        )
        return AnomalyOutput(anomaly_map.flatten(1).amax(dim=1), anomaly_map)
