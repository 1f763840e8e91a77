"""Memory modules: a set of learned prototype items that a latent is rebuilt from.

MemAE (Gong et al., ICCV 2019): every latent position (a query) is replaced by a convex
combination of N memory items, addressed by a softmax over similarities and made sparse by hard
shrinkage, so an anomalous query is rebuilt from normal prototypes.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.schema import PositiveInt, Range, check_arguments

Similarity = Literal["dot", "cosine"]


def hard_shrink(weights: torch.Tensor, threshold: float, eps: float = 1e-12) -> torch.Tensor:
    """MemAE's eq. 7, the continuous hard shrinkage: max(w - lambda, 0) * w / (|w - lambda| + eps),
    which keeps w (up to eps) where w > lambda and is 0 elsewhere, with a usable gradient."""
    return F.relu(weights - threshold) * weights / ((weights - threshold).abs() + eps)


def addressing_entropy(weights: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean over queries of the entropy -sum_i w_i log w_i of their addressing weights (N last)."""
    return -(weights * torch.log(weights + eps)).sum(dim=-1).mean()


class MemAEMemory(nn.Module):
    """N items of `channels` dims; `forward` rebuilds a B x C x h x w latent position by position.

    `similarity`: "dot" (the authors' code: the plain dot product z . m_i) or "cosine" (the
    paper's eq. 5). `shrink_threshold` (lambda): weights at or below it are zeroed and the rest
    renormalised to sum 1 (L1); 0 turns the shrinkage off. The paper advises lambda in [1/N, 3/N].
    """

    def __init__(
        self, num_items: PositiveInt, channels: PositiveInt, shrink_threshold: Annotated[float, Range(0, 1, high_open=True)] = 0.0025,
        similarity: Similarity = "dot",
    ) -> None:
        super().__init__()
        check_arguments(MemAEMemory, {"shrink_threshold": shrink_threshold, "similarity": similarity}, "method")
        bound = 1 / math.sqrt(channels)  # the authors' uniform initialisation
        self.items = nn.Parameter(torch.empty(num_items, channels).uniform_(-bound, bound))
        self.shrink_threshold = shrink_threshold
        self.similarity = similarity

    def address(self, queries: torch.Tensor) -> torch.Tensor:
        """Q x C queries -> Q x N addressing weights (each row sums to 1)."""
        if self.similarity == "cosine":
            logits = F.normalize(queries, dim=1) @ F.normalize(self.items, dim=1).T
        else:
            logits = queries @ self.items.T
        weights = torch.softmax(logits, dim=1)
        if self.shrink_threshold > 0:
            weights = F.normalize(hard_shrink(weights, self.shrink_threshold), p=1, dim=1)
        return weights

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x C x h x w -> (the rebuilt latents, B x h x w x N addressing weights)."""
        batch, channels, height, width = latents.shape
        queries = latents.permute(0, 2, 3, 1).reshape(-1, channels)
        weights = self.address(queries)
        rebuilt = (weights @ self.items).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return rebuilt, weights.reshape(batch, height, width, -1)


class MNADMemory(nn.Module):
    """MNAD's memory (Park et al., CVPR 2020): M unit-norm items of C dims, a buffer moved by the
    update rule (never by gradients).

    - `read(queries)`: each unit-norm query q_k is paired with the items weighted by a softmax
      over the items of q_k . p_m (the weights carry no gradient, as in the authors' code):
      returns concat(q_k, read_k).
    - `update(queries)`: each item p_m moves towards the queries whose nearest item it is,
      weighted by the softmax over the queries of q_k . p_m divided by its maximum over all
      queries, then renormalised: p_m <- normalise(p_m + sum_k v'_km q_k). No gradient.
    - `losses(queries)`: compactness = mean squared distance of each query to its nearest item
      (eq. 8, MSE as the code), separateness = triplet loss with the nearest item as positive and
      the second nearest as negative, margin `margin` (eq. 9); items detached.
    - `distances(queries)`: the compactness distance per image (the test-time score's second part).
    `queries` are N x C rows (flattened positions), already L2-normalised.
    """

    def __init__(
        self, num_items: Annotated[int, Range(low=2)] = 10, channels: PositiveInt = 512, margin: float = 1.0, seed: int = 0
    ) -> None:
        super().__init__()
        check_arguments(MNADMemory, {"num_items": num_items}, "method")  # separateness needs a second item
        items = torch.rand(num_items, channels, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("items", F.normalize(items, dim=1))  # the authors' start: normalised U(0, 1)
        self.margin = margin

    def read(self, queries: torch.Tensor) -> torch.Tensor:
        """N x C -> N x 2C: each query with its read from memory."""
        weights = torch.softmax(queries @ self.items.T, dim=1).detach()
        return torch.cat([queries, weights @ self.items], dim=1)

    def nearest(self, queries: torch.Tensor, count: int = 1) -> torch.Tensor:
        """N x `count` indices of the items with the largest similarity to each query, best first."""
        return (queries @ self.items.T).topk(count, dim=1).indices

    @torch.no_grad()
    def update(self, queries: torch.Tensor) -> None:
        similarity = queries.detach() @ self.items.T
        nearest = similarity.argmax(dim=1)
        scores = torch.softmax(similarity, dim=0)  # over the queries, per item
        weights = scores / scores.amax(dim=0, keepdim=True)
        owned = F.one_hot(nearest, len(self.items)).to(weights) * weights  # N x M, zero where not the nearest
        self.items.copy_(F.normalize(self.items + owned.T @ queries.detach(), dim=1))

    def losses(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(compactness, separateness), each a mean over the queries."""
        order = self.nearest(queries, 2)
        positive, negative = self.items[order[:, 0]].detach(), self.items[order[:, 1]].detach()
        compactness = F.mse_loss(queries, positive)
        separateness = F.triplet_margin_loss(queries, positive, negative, margin=self.margin)
        return compactness, separateness

    def distances(self, queries: torch.Tensor, count: int) -> torch.Tensor:
        """Mean squared distance of each query to its nearest item, averaged per image (`count`
        images, their positions consecutive in `queries`)."""
        positive = self.items[self.nearest(queries)[:, 0]]
        return (queries - positive).pow(2).reshape(count, -1).mean(dim=1)
