"""GANomaly (Akcay et al., ACCV 2018): an encoder-decoder-encoder generator against a discriminator.

The generator encodes an image to z (G_E), decodes it to x_hat (G_D) and encodes x_hat again to
z_hat (E). Trained on normal images only, it learns to keep z_hat close to z for them; an anomaly
decodes to a normal-looking x_hat whose code z_hat moves away from z. Score of an image: the mean
of (z - z_hat)^2 over the latent's dimensions, computed from that image alone (the authors' code
then min-max normalises the scores over the whole test set, and anomalib does the same, so an
image's score there depends on the other test images: not here).

Networks: DCGAN encoders and decoder (`components.autoencoders`), images in [-1, 1] inside the
model (the authors' normalisation, tanh output), DCGAN initialisation. Generator loss:
`adversarial_weight` x L2 between the discriminator's last feature maps of x and x_hat (feature
matching) + `contextual_weight` x L1(x, x_hat) + `encoder_weight` x L2(z, z_hat); 1 / 50 / 1 in
the paper. The discriminator: binary cross-entropy, real x against x_hat.
GANomaly scores whole images; its anomaly map here is the generator's residual |x - x_hat|
(mean over channels, in [0, 1] image units), for looking at, not part of the paper's score.
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
from anomalib_lite.models.components.interfaces import Reconstructs, TrainableModel
from anomalib_lite.schema import PositiveInt, Size


class GanomalyModel(TrainableModel, Reconstructs):
    """`latent_channels`: the size of z (the paper's 100); `width`: the DCGAN's first width (64);
    `depth`: stride-2 stages (128 px with depth 5 gives DCGAN's 4 x 4 bottom)."""

    def __init__(
        self,
        image_size: Size,
        latent_channels: PositiveInt = 100,
        width: PositiveInt = 64,
        depth: PositiveInt = 5,
        adversarial_weight: float = 1.0,
        contextual_weight: float = 50.0,
        encoder_weight: float = 1.0,
    ) -> None:
        super().__init__()
        side = square_side(image_size)
        self.encoder = ConvEncoder(side, latent_channels, 3, width, depth)
        self.decoder = ConvDecoder(side, latent_channels, 3, width, depth, output="tanh")
        self.reencoder = ConvEncoder(side, latent_channels, 3, width, depth)
        self.discriminator = ConvEncoder(side, 1, 3, width, depth)  # features, then one logit
        self.weights = {"adversarial": adversarial_weight, "contextual": contextual_weight, "encoder": encoder_weight}
        self.apply(init_dcgan_weights)

    def generator_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters(), *self.reencoder.parameters()]

    def generate(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images in [0, 1] -> (x in [-1, 1], x_hat, z, z_hat); z, z_hat as B x latent vectors."""
        real = images * 2 - 1
        latent = self.encoder(real)
        fake = self.decoder(latent)
        return real, fake, latent.flatten(1), self.reencoder(fake).flatten(1)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return (self.generate(images)[1] + 1) / 2

    def generator_terms(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(loss terms with their weighted sum "loss", x in [-1, 1], x_hat): the generator's objective."""
        real, fake, latent, relatent = self.generate(images)
        terms = {
            "adversarial": F.mse_loss(self.discriminator.features(fake), self.discriminator.features(real)),
            "contextual": F.l1_loss(fake, real),
            "encoder": F.mse_loss(relatent, latent),
        }
        terms["loss"] = sum(self.weights[name] * terms[name] for name in self.weights)
        return terms, real, fake

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """BCE of real (label 1) and generated (label 0) images, averaged (the authors' 0.5 x sum)."""
        real_logits, fake_logits = self.discriminator(real).flatten(), self.discriminator(fake).flatten()
        real_loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        fake_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        return 0.5 * (real_loss + fake_loss)

    def reinitialize_discriminator(self) -> None:
        """The authors' remedy when the discriminator's loss collapses (< 1e-5): start it afresh."""
        self.discriminator.apply(init_dcgan_weights)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Validation loss: the generator's contextual and encoder terms (weighted), which do not
        depend on the discriminator's state."""
        real, fake, latent, relatent = self.generate(images)
        return self.weights["contextual"] * F.l1_loss(fake, real) + self.weights["encoder"] * F.mse_loss(relatent, latent)

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        real, fake, latent, relatent = self.generate(images)
        scores = (latent - relatent).pow(2).mean(dim=1)
        residual = ((real - fake).abs() / 2).mean(dim=1)  # [-1, 1] differences in [0, 1] image units
        return AnomalyOutput(scores, residual)
