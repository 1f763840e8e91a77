"""OGNet, "Old is Gold" (Zaheer et al., CVPR 2020): a discriminator taught to tell good
reconstructions from bad ones, with an old generator as the source of the bad ones.

Phase one trains an adversarial one-class baseline (ALOCC-style): a reconstructor G takes the
image with Gaussian noise, x + eta, and is trained to fool D and to reconstruct x; D tells real
images from G's outputs. A snapshot of G at an early epoch is kept as G_old. Phase two fine-tunes
D alone: positives are x and G(x) (good reconstructions of normal images), negatives G_old(x)
(poor ones) and pseudo anomalies G_old((G_old(x_i) + G_old(x_j)) / 2). Score: D(G(x)), the
probability that G's reconstruction is a good one; the anomaly score here is its negative
logit (the same order as 1 - D(G(x)), without the sigmoid's ties at 0 and 1).

Networks (the authors' `network.py`, their only published code with the test script): G is four
5 x 5 convolutions of stride 1 without padding (widths w, 2w, 4w, 8w; BatchNorm, ReLU) and four
transposed ones back (tanh out); D is four 5 x 5 convolutions of stride 2 (padding 2; BatchNorm
and ReLU, none after the last) and a linear layer to one logit. w = 64. Images in [-1, 1].

The training code is not published; the choices made here from the paper's description:
- phase one: D and G alternate per batch, non-saturating adversarial losses (BCE),
  G's loss = adversarial + `reconstruction_weight` x MSE(G(x + eta), x), eta ~ N(0, `noise_std`^2);
- G_old: G as it was after `old_fraction` (0.6) of phase one's steps (the paper: a low-epoch G;
  a fraction works for any number of epochs, one included);
- phase two: after phase one's last step, `phase_two_steps` D steps at `phase_two_lr` on
  training batches (cycling through them); the pseudo anomaly of image i pairs it with the next
  image of its batch (j = i + 1, cyclic); the loss is the mean of BCE(D(x), 1), BCE(D(G(x)), 1),
  BCE(D(G_old(x)), 0) and BCE(D(pseudo), 0);
- the map: |x - G(x)| (mean over channels, [0, 1] image units), for looking: OGNet scores images.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.models.components.anomaly_map import AnomalyOutput
from anomalib_lite.models.components.interfaces import Reconstructs, TrainableModel
from anomalib_lite.schema import PositiveInt, Size


def _generator(width: int) -> nn.Sequential:
    widths = [3, width, 2 * width, 4 * width, 8 * width]
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Conv2d(a, b, 5), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
    for a, b in zip(widths[:0:-1], widths[-2::-1]):
        layers += [nn.ConvTranspose2d(a, b, 5), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
    layers[-2:] = [nn.Tanh()]  # the last transposed convolution goes straight to tanh
    return nn.Sequential(*layers)


class OgnetDiscriminator(nn.Module):
    """Four stride-2 5 x 5 convolutions, then one logit per image."""

    def __init__(self, image_size: tuple[int, int], width: int) -> None:
        super().__init__()
        widths = [3, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, b, 5, 2, 2), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
        del layers[-2]  # no BatchNorm after the last convolution (the authors')
        self.features = nn.Sequential(*layers, nn.Flatten())
        height, width_ = (math.ceil(side / 16) for side in image_size)
        self.classifier = nn.Linear(8 * width * height * width_, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images)).flatten()


class OgnetModel(TrainableModel, Reconstructs):
    """`width`: the networks' first width (64); the rest: see the module docstring."""

    def __init__(
        self,
        image_size: Size,
        width: PositiveInt = 64,
        noise_std: float = 0.155,
        reconstruction_weight: float = 0.4,
    ) -> None:
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.generator = _generator(width)
        self.discriminator = OgnetDiscriminator(size, width)
        self.old_generator = copy.deepcopy(self.generator).requires_grad_(False)
        self.noise_std = noise_std
        self.reconstruction_weight = reconstruction_weight

    def keep_old_generator(self) -> None:
        """G_old <- G (frozen): the snapshot phase two takes its poor reconstructions from."""
        self.old_generator.load_state_dict(self.generator.state_dict())
        self.old_generator.requires_grad_(False)

    @staticmethod
    def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))

    def phase_one_losses(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(D's loss, G's loss, G's terms) for images in [0, 1]: D on x against G(x + eta) (detached),
        G on fooling D and reconstructing x."""
        real = images * 2 - 1
        noisy = real + self.noise_std * torch.randn_like(real)
        fake = self.generator(noisy)
        discriminator_loss = 0.5 * (self._bce(self.discriminator(real), 1.0) + self._bce(self.discriminator(fake.detach()), 0.0))
        terms = {"adversarial": self._bce(self.discriminator(fake), 1.0), "reconstruction": F.mse_loss(fake, real)}
        generator_loss = terms["adversarial"] + self.reconstruction_weight * terms["reconstruction"]
        return discriminator_loss, generator_loss, terms

    def pseudo_anomalies(self, real: torch.Tensor, old: torch.Tensor | None = None) -> torch.Tensor:
        """G_old((G_old(x_i) + G_old(x_j)) / 2) with j = i + 1 (cyclic), for x in [-1, 1]; `old`:
        G_old(x) if already computed."""
        old = self.old_generator(real) if old is None else old
        return self.old_generator((old + old.roll(1, dims=0)) / 2)

    def phase_two_loss(self, images: torch.Tensor) -> torch.Tensor:
        """D's loss: x and G(x) good (1), G_old(x) and pseudo anomalies poor (0); G and G_old fixed."""
        real = images * 2 - 1
        self.generator.eval()  # fixed in phase two, as at test time (BatchNorm with its statistics)
        self.old_generator.eval()
        with torch.no_grad():
            good, poor = self.generator(real), self.old_generator(real)
            pseudo = self.pseudo_anomalies(real, poor)
        discriminator = self.discriminator
        return 0.25 * (
            self._bce(discriminator(real), 1.0) + self._bce(discriminator(good), 1.0)
            + self._bce(discriminator(poor), 0.0) + self._bce(discriminator(pseudo), 0.0)
        )

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Validation loss: G's reconstruction MSE on held-out normal images (no noise)."""
        real = images * 2 - 1
        return F.mse_loss(self.generator(real), real)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return (self.generator(images * 2 - 1) + 1) / 2

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        real = images * 2 - 1
        reconstruction = self.generator(real)
        scores = -self.discriminator(reconstruction)
        return AnomalyOutput(scores, ((real - reconstruction).abs() / 2).mean(dim=1))
