"""MemAE (Gong et al., ICCV 2019): a memory-augmented autoencoder.

The encoder's latent map is not decoded as it is: every position (a query) is replaced by a
sparse convex combination of N learned memory items (`components.memory.MemAEMemory`), so the
decoder only ever sees combinations of normal prototypes and reconstructs anomalies poorly.
Training loss: MSE + `entropy_weight` x the entropy of the addressing weights (0.0002 in the
paper), which pushes each query towards few items. Map: per-pixel squared error; image score:
its maximum or mean (the paper scores the mean, i.e. the image's reconstruction error).
The network here is the DCGAN-style convolutional encoder-decoder of `components.autoencoders`
with a latent map (the paper's image networks: stride-2 convolutions with BatchNorm, 4 of them
for CIFAR-10, to a 256-channel map).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anomalib_lite.models.components.autoencoders import ConvDecoder, ConvEncoder, square_side
from anomalib_lite.models.components.memory import MemAEMemory, addressing_entropy
from anomalib_lite.models.components.reconstruction import ReconstructionModel
from anomalib_lite.schema import PositiveInt, Size


class MemAEModel(ReconstructionModel):
    """`num_items` memory items of `latent_channels` dims; `shrink_threshold`, `similarity`: see
    `MemAEMemory` (the authors' code addresses by dot product, the paper by cosine similarity)."""

    def __init__(
        self,
        image_size: Size,
        latent_channels: PositiveInt = 256,
        width: PositiveInt = 32,
        depth: PositiveInt = 4,
        num_items: PositiveInt = 500,
        shrink_threshold: float = 0.0025,
        similarity: str = "dot",
        entropy_weight: float = 0.0002,
        score: str = "mean",
        map_sigma: float = 0.0,
    ) -> None:
        super().__init__("l2", score, map_sigma=map_sigma)
        side = square_side(image_size)
        self.encoder = ConvEncoder(side, latent_channels, 3, width, depth, flat=False)
        self.memory = MemAEMemory(num_items, latent_channels, shrink_threshold, similarity)
        self.decoder = ConvDecoder(side, latent_channels, 3, width, depth, flat=False)
        self.entropy_weight = entropy_weight

    def reconstruct_and_address(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstructions, addressing weights B x h x w x N)."""
        rebuilt, weights = self.memory(self.encoder(images))
        return self.decoder(rebuilt), weights

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.reconstruct_and_address(images)[0]

    def loss_terms(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        reconstructions, weights = self.reconstruct_and_address(images)
        terms = {"mse": F.mse_loss(reconstructions, images), "entropy": addressing_entropy(weights)}
        return {"loss": terms["mse"] + self.entropy_weight * terms["entropy"], **terms}

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        return self.loss_terms(images)["loss"]
