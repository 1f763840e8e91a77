"""CutPaste (Li et al., CVPR 2021): self-supervised classification of CutPaste augmentations,
then a Gaussian density of the learned representations of normal images.

Two networks of the same design: an image-level one (the image score) and, with `localization`,
a patch-level one trained on random `patch_size` crops, whose densities over dense patches give
the anomaly map (the paper's localisation section). Their parameters are disjoint, so training
them side by side on the summed loss is training each alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf
from torch import nn

from anomalib_lite.models.components import (
    AnomalyOutput,
    FittedOnEmbeddings,
    ImageEncoder,
    TrainableModel,
    batch_chunks,
)
from anomalib_lite.models.components.anomaly_map import average_over_patches, blur_anomaly_map
from anomalib_lite.schema import PositiveInt

NUM_CLASSES = 3  # normal, CutPaste, CutPaste-Scar (the paper's 3-way task)


class CutPasteNet(nn.Module):
    """Encoder (any timm backbone, pooled) -> MLP projection head -> 3-way classifier.

    The head is Linear-BN-ReLU per entry of `head_layers`; the default (eight of 512, then 128)
    is the public re-implementation's reading of the paper's "MLP projection head" (the official
    code is not available to us). The density is fitted on the encoder's pooled features.
    """

    def __init__(self, backbone: dict, head_layers: Sequence[int]) -> None:
        super().__init__()
        self.encoder = ImageEncoder(**backbone)
        layers: list[nn.Module] = []
        width = self.encoder.out_features
        for out in head_layers:
            layers += [nn.Linear(width, out), nn.BatchNorm1d(out), nn.ReLU(inplace=True)]
            width = out
        self.head = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features B x D, class logits B x 3)."""
        features = self.encoder(images)
        return features, self.classifier(self.head(features))


class GaussianDensity(nn.Module):
    """Mean and Ledoit-Wolf-shrunk covariance of normal embeddings; score = Mahalanobis distance.

    The paper's Gaussian density estimator: -log p(x) is half the squared Mahalanobis distance
    plus a constant, so both rank alike. scikit-learn's LedoitWolf keeps the covariance
    invertible when there are fewer images than dimensions.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("precision", torch.eye(dim))

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor) -> None:
        estimate = LedoitWolf().fit(embeddings.detach().double().cpu().numpy())
        self.mean.copy_(torch.from_numpy(estimate.location_))
        self.precision.copy_(torch.from_numpy(np.asarray(estimate.precision_)))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        centred = embeddings - self.mean
        return (centred @ self.precision * centred).sum(-1).clamp_min(0).sqrt()


def patch_positions(size: int, patch_size: int, stride: int) -> list[int]:
    """Top-left offsets along one side at `stride`, plus a last one flush with the edge (every pixel covered)."""
    positions = list(range(0, size - patch_size + 1, stride))
    if positions[-1] != size - patch_size:
        positions.append(size - patch_size)
    return positions


class CutPasteModel(TrainableModel, FittedOnEmbeddings):
    """Image score: Mahalanobis distance of the image's representation to the normal Gaussian.

    Map (`localization`): the patch network's distance of every `patch_size` patch at
    `patch_stride`, each pixel the mean over the patches that cover it, Gaussian-smoothed
    (`map_sigma`). Without localisation the map is the image score everywhere.
    """

    def __init__(
        self,
        backbone: dict,
        head_layers: Sequence[int] = (512, 512, 512, 512, 512, 512, 512, 512, 128),
        localization: bool = True,
        patch_size: PositiveInt = 64,
        patch_stride: PositiveInt = 16,
        map_sigma: float = 4.0,
        patch_chunk: PositiveInt = 256,
    ) -> None:
        super().__init__()
        self.image_net = CutPasteNet(backbone, head_layers)
        self.image_density = GaussianDensity(self.image_net.encoder.out_features)
        self.localization = localization
        self.patch_size, self.patch_stride = patch_size, patch_stride
        self.map_sigma = map_sigma
        self.patch_chunk = patch_chunk
        if localization:
            self.patch_net = CutPasteNet(backbone, head_layers)
            self.patch_density = GaussianDensity(self.patch_net.encoder.out_features)

    # -- training ------------------------------------------------------------------------------
    @staticmethod
    def _cross_entropy(net: CutPasteNet, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """3-way cross-entropy: views[k] are images of class k (normal, CutPaste, scar)."""
        _, logits = net(torch.cat(list(views)))
        labels = torch.cat([torch.full((len(v),), k, device=logits.device) for k, v in enumerate(views)])
        return F.cross_entropy(logits, labels)

    def classification_loss(
        self, image_views: Sequence[torch.Tensor], patch_views: Sequence[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        terms = {"image_ce": self._cross_entropy(self.image_net, image_views)}
        if self.localization:
            if patch_views is None:
                raise ValueError("localization is on: patch views are needed")
            terms["patch_ce"] = self._cross_entropy(self.patch_net, patch_views)
        return {"loss": sum(terms.values()), **terms}

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of normal images (and their central patches) as class "normal": the
        validation loss only; the epoch is chosen by the label-free synthetic validation."""
        views = [images]
        patch_views = None
        if self.localization:
            top, left = ((s - self.patch_size) // 2 for s in images.shape[-2:])
            patch_views = [images[..., top : top + self.patch_size, left : left + self.patch_size]]
        return self.classification_loss(views, patch_views)["loss"]

    # -- the densities ---------------------------------------------------------------------------
    def _patches(self, images: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        """(B x L x 3 x p x p patches, row offsets, column offsets)."""
        height, width = images.shape[-2:]
        if min(height, width) < self.patch_size:
            raise ValueError(f"images of {height} x {width} px are smaller than patch_size={self.patch_size}")
        ys = patch_positions(height, self.patch_size, self.patch_stride)
        xs = patch_positions(width, self.patch_size, self.patch_stride)
        windows = images.unfold(2, self.patch_size, 1).unfold(3, self.patch_size, 1)  # B x 3 x H' x W' x p x p (a view)
        # One gather of the ny x nx windows (indexing rows, then columns, would copy every row's W' windows).
        rows = torch.tensor(ys, device=images.device).view(-1, 1)
        columns = torch.tensor(xs, device=images.device).view(1, -1)
        patches = windows[:, :, rows, columns]  # B x 3 x ny x nx x p x p
        return patches.permute(0, 2, 3, 1, 4, 5).flatten(1, 2), ys, xs

    def _patch_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        patches, ys, xs = self._patches(images)
        flat = patches.flatten(0, 1)
        features = torch.cat([self.patch_net(chunk)[0] for chunk in batch_chunks(flat, self.patch_chunk)])
        return features.view(images.shape[0], -1, features.shape[-1]), ys, xs

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B x (1 + L) x D: the image's features, then those of its L patches (with localisation)."""
        image_features = self.image_net(images)[0].unsqueeze(1)
        if not self.localization:
            return image_features
        return torch.cat([image_features, self._patch_features(images)[0]], dim=1)

    def fit(self, embeddings: torch.Tensor) -> None:
        self.image_density.fit(embeddings[:, 0])
        if self.localization:
            self.patch_density.fit(embeddings[:, 1:].flatten(0, 1))

    # -- inference -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        scores = self.image_density(self.image_net(images)[0])
        height, width = images.shape[-2:]
        if not self.localization:
            return AnomalyOutput(scores, scores.view(-1, 1, 1).expand(-1, height, width).contiguous())
        features, ys, xs = self._patch_features(images)
        patch_scores = self.patch_density(features).view(-1, len(ys), len(xs))
        patch_map = average_over_patches(patch_scores, (height, width), self.patch_size, ys, xs)
        anomaly_map = blur_anomaly_map(patch_map, self.map_sigma)
        return AnomalyOutput(scores, anomaly_map)
