"""Variational autoencoder, the PaDiM paper's baseline (Defard et al., ICPR 2021, section 4.3).

The paper's description: a ResNet-18 encoder (trained from scratch here, like the whole model),
an 8 x 8 convolutional latent variable (the encoder's stride-32 map at 256 px), a decoder, and the
per-pixel L2 reconstruction error as the anomaly map. The decoder is not described: it mirrors the
encoder with transposed convolutions (`components.autoencoders.ConvDecoder`). Training maximises
the evidence lower bound with one reparameterised sample; scoring reconstructs from the latent's
mean, so a test image's map is deterministic.

The decoder's BatchNorm statistics are re-estimated for that scoring path before every
validation (`fit`: the training images' latent means, decoded in train mode, a cumulative
average). The running statistics gathered in training come from sampled latents, whose variance
is the means' plus the posterior's: decoding the means with them mis-scales every layer. On
bottle at 128 px the validation loss then rose from 2137 to 5407 over 50 epochs while the
training loss fell (the run kept epoch 1: image AUROC 0.56); decoding sampled latents, or the
means with batch statistics, gave losses at the training loss's level.
"""

from __future__ import annotations

import math

import timm
import torch
from torch import nn

from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components.autoencoders import ConvDecoder, square_side
from anomalib_lite.models.components.interfaces import FittedOnEmbeddings
from anomalib_lite.models.components.reconstruction import ReconstructionModel, reconstruction_error_map
from anomalib_lite.schema import PositiveInt, Size


class VaeModel(ReconstructionModel, FittedOnEmbeddings):
    """`encoder`: a timm architecture, built without pretrained weights; its last feature map
    (stride 32 for ResNet-18) gives the mean and log-variance of a `latent_channels` x h x w
    latent (1 x 1 convolutions). `decoder_width`: channels of the decoder's last stage, doubled
    per stage towards the latent. Loss per image: the error map summed over pixels (for "l2",
    the Gaussian negative log-likelihood up to constants) + `kl_weight` x KL(q(z|x) || N(0, I)).
    """

    def __init__(
        self,
        image_size: Size,
        encoder: str = "resnet18",
        latent_channels: PositiveInt = 64,
        decoder_width: PositiveInt = 32,
        kl_weight: float = 1.0,
        error: str = "l2",
        score: str = "max",
        ssim_window: PositiveInt = 11,
        map_sigma: float = 0.0,
    ) -> None:
        super().__init__(error, score, ssim_window, map_sigma)
        side = square_side(image_size)
        try:
            self.encoder = timm.create_model(encoder, pretrained=False, features_only=True, out_indices=(-1,))
        except RuntimeError as error:
            raise UserInputError(f"method.encoder: timm has no architecture named '{encoder}'") from error
        channels, stride = self.encoder.feature_info.channels()[-1], self.encoder.feature_info.reduction()[-1]
        depth = round(math.log2(stride))
        if 2**depth != stride:
            raise UserInputError(f"method.encoder '{encoder}' reduces by {stride}, not a power of two")
        self.to_latent = nn.Conv2d(channels, 2 * latent_channels, 1)
        self.decoder = ConvDecoder(side, latent_channels, 3, decoder_width, depth, flat=False)
        self.kl_weight = kl_weight

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance), each B x latent_channels x h x w."""
        mean, log_variance = self.to_latent(self.encoder(images)[-1]).chunk(2, dim=1)
        return mean, log_variance

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """From the latent's mean: deterministic (scoring)."""
        return self.decoder(self.encode(images)[0])

    def elbo_terms(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The negative ELBO ("loss") and its two terms, means over the batch. In training mode the
        latent is sampled (reparameterisation); in eval mode its mean is used (validation loss)."""
        mean, log_variance = self.encode(images)
        latent = mean + torch.randn_like(mean) * torch.exp(0.5 * log_variance) if self.training else mean
        reconstruction = reconstruction_error_map(images, self.decoder(latent), self.error, self.ssim_window).flatten(1).sum(1).mean()
        kl = (-0.5 * (1 + log_variance - mean.pow(2) - log_variance.exp())).flatten(1).sum(1).mean()
        return {"loss": reconstruction + self.kl_weight * kl, "reconstruction": reconstruction, "kl": kl}

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        return self.elbo_terms(images)["loss"]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The latent means (what scoring decodes)."""
        return self.encode(images)[0]

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor, chunk: int = 32) -> None:
        """The decoder's BatchNorm running statistics from decoding every training image's latent
        mean (train mode, cumulative average over chunks): the statistics of the scoring path."""
        norms = [m for m in self.decoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        was_training = self.decoder.training
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        self.decoder.train()
        try:
            for latents in embeddings.split(chunk):
                self.decoder(latents)
        finally:
            self.decoder.train(was_training)
            for norm, momentum in zip(norms, momenta):
                norm.momentum = momentum
