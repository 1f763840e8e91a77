"""AnoGAN (Schlegl et al., IPMI 2017): a DCGAN of normal images, and a search of its latent space.

Training is a plain DCGAN (`components.autoencoders`: the decoder as generator from a latent
vector z ~ N(0, I), the encoder as discriminator), images in [-1, 1] inside the model. At test time
each image x is mapped to the latent space by `search_steps` (the paper's Gamma = 500) gradient
steps on z, minimising
    L(z) = (1 - lambda) sum |x - G(z)| + lambda sum |f_D(x) - f_D(G(z))|,   lambda = 0.1,
the residual loss plus the discrimination loss on the discriminator's last feature maps f_D
(section 2.2), with the generator and discriminator frozen. The anomaly score is L at the last
step; the map is the residual |x - G(z)| (mean over channels, in [0, 1] image units).

The images of a batch are searched together, each with its own z and its own loss: Adam updates
each coordinate from its own gradient, so a batch gives every image the result it gets alone.
Every search starts from the same z (drawn once from N(0, I) with `latent_seed` and kept with the
weights): the paper starts from a random sample; a fixed one makes an image's score its own,
whatever batch it is scored in, and reproducible. Adam with `search_lr` moves z (the paper does
not name the optimiser).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from anomalib_lite.models.components.anomaly_map import AnomalyOutput
from anomalib_lite.models.components.autoencoders import (
    ConvDecoder,
    ConvEncoder,
    init_dcgan_weights,
    square_side,
)
from anomalib_lite.models.components.gradients import gradients_enabled
from anomalib_lite.models.components.interfaces import Reconstructs, TrainableModel
from anomalib_lite.schema import PositiveInt, Size


class AnoGanModel(TrainableModel, Reconstructs):
    """`latent_channels`: the size of z (DCGAN's 100); `width`, `depth`: the DCGAN's first width and
    stride-2 stages; `residual_weight` is 1 - lambda (0.9); `search_steps`, `search_lr`: the latent search."""

    not_exportable = "its score is a search: gradient steps on a latent code for every test image"

    def __init__(
        self,
        image_size: Size,
        latent_channels: PositiveInt = 100,
        width: PositiveInt = 64,
        depth: PositiveInt = 4,
        discrimination_weight: float = 0.1,
        search_steps: PositiveInt = 500,
        search_lr: float = 0.01,
        latent_seed: int = 0,
    ) -> None:
        super().__init__()
        side = square_side(image_size)
        self.generator = ConvDecoder(side, latent_channels, 3, width, depth, output="tanh")
        self.discriminator = ConvEncoder(side, 1, 3, width, depth)  # features, then one logit
        self.apply(init_dcgan_weights)
        self.latent_channels = latent_channels
        self.discrimination_weight = discrimination_weight
        self.search_steps = search_steps
        self.search_lr = search_lr
        start = torch.randn(latent_channels, generator=torch.Generator().manual_seed(latent_seed))
        self.register_buffer("initial_latent", start)

    def sample_latents(self, count: int) -> torch.Tensor:
        return torch.randn(count, self.latent_channels, 1, 1, device=self.initial_latent.device)

    def discriminator_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.discriminator(images).flatten()

    def generator_loss(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(non-saturating generator loss -log D(G(z)), the generated images), z ~ N(0, I)."""
        fake = self.generator(self.sample_latents(count))
        logits = self.discriminator_logits(fake)
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)), fake

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """BCE of real (1) and generated (0) images, averaged."""
        real_logits, fake_logits = self.discriminator_logits(real), self.discriminator_logits(fake)
        return 0.5 * (
            F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        )

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Validation loss: how well the discriminator tells held-out normal images from samples."""
        return self.discriminator_loss(images * 2 - 1, self.generator(self.sample_latents(len(images))))

    def mapping_loss(
        self, real: torch.Tensor, real_features: torch.Tensor, latents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image (B): (1 - lambda) x residual + lambda x discrimination loss; and G(z).
        `real` in [-1, 1], `real_features` its discriminator features."""
        fake = self.generator(latents)
        residual = (real - fake).abs().flatten(1).sum(1)
        discrimination = (real_features - self.discriminator.features(fake)).abs().flatten(1).sum(1)
        weight = self.discrimination_weight
        return (1 - weight) * residual + weight * discrimination, fake

    def search(
        self, images: torch.Tensor, steps: int | None = None, record: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """The latent search for images in [0, 1]: (final loss per image, G(z) at the end, and with
        `record` the batch's summed loss before every step and after the last). The weights stay
        as they are (frozen during the search)."""
        steps = self.search_steps if steps is None else steps
        trace: list[float] = []
        trainable = [p for p in self.parameters() if p.requires_grad]
        with gradients_enabled():
            real = images.detach().clone() * 2 - 1
            latents = self.initial_latent.detach().clone().repeat(len(images), 1)
            latents = latents.reshape(len(images), -1, 1, 1).requires_grad_(True)
            optimizer = torch.optim.Adam([latents], lr=self.search_lr)
            for parameter in trainable:
                parameter.requires_grad_(False)
            try:
                real_features = self.discriminator.features(real)
                for _ in range(steps):
                    loss, _ = self.mapping_loss(real, real_features, latents)
                    if record:
                        trace.append(float(loss.detach().sum()))
                    optimizer.zero_grad()
                    loss.sum().backward()
                    optimizer.step()
                with torch.no_grad():
                    loss, fake = self.mapping_loss(real, real_features, latents)
            finally:
                for parameter in trainable:
                    parameter.requires_grad_(True)
        if record:
            trace.append(float(loss.sum()))
        return loss.detach(), fake.detach(), trace

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """G(z) at the end of the latent search."""
        return (self.search(images)[1] + 1) / 2

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        scores, fake, _ = self.search(images)
        residual = ((images * 2 - 1 - fake).abs() / 2).mean(dim=1)
        return AnomalyOutput(scores, residual)
