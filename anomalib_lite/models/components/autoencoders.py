"""Convolutional encoder and decoder blocks shared by the reconstruction and generative methods.

DCGAN's layout (Radford et al. 2016), which GANomaly, AnoGAN, OGNet and the convolutional
autoencoders of the field build on: 4 x 4 convolutions of stride 2 that halve the side and double
the width (BatchNorm + LeakyReLU 0.2; no BatchNorm after the first, as in DCGAN), `depth` times,
down to a b x b map (b = side / 2^depth); then the latent, either a vector (a b x b convolution
to `latent_channels` x 1 x 1, DCGAN) or a map (a 3 x 3 convolution to `latent_channels` x b x b,
for methods that address a memory per position). The decoder mirrors it with transposed convolutions (BatchNorm + ReLU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from anomalib_lite.errors import UserInputError


def square_side(image_size: int | Sequence[int]) -> int:
    """The side of a square input size (an int, or [h, w] with h == w)."""
    if isinstance(image_size, int):
        return image_size
    height, width = image_size
    if height != width:
        raise UserInputError(f"these convolutional networks take square images, got {height} x {width}: set a square dataset.image_size")
    return int(height)


def bottom_side(image_size: int, depth: int) -> int:
    """The side after `depth` halvings of `image_size` (which must be divisible by 2^depth)."""
    if depth < 1 or image_size % 2**depth:
        raise UserInputError(
            f"the image side {image_size} must be divisible by 2^depth = {2 ** depth} for these convolutional "
            f"networks (depth {depth}): e.g. dataset.image_size={max(2 ** depth, image_size // 2**depth * 2**depth)} "
            "with dataset.crop_size=null, or another method.depth"
        )
    return image_size // 2**depth


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN's initialisation: convolution weights N(0, 0.02); BatchNorm scales N(1, 0.02), shifts 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class ConvEncoder(nn.Module):
    """B x C x S x S images -> B x `latent_channels` x 1 x 1 (`flat`) or x b x b latents (b = S / 2^`depth`).

    `width`: channels after the first convolution, doubled at every further halving.
    `features(x)` is the last map before the latent (a discriminator's feature-matching layer).
    """

    def __init__(
        self, image_size: int, latent_channels: int, in_channels: int = 3, width: int = 64,
        depth: int = 4, flat: bool = True,
    ) -> None:
        super().__init__()
        bottom = bottom_side(image_size, depth)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        channels = width
        for _ in range(depth - 1):
            layers += [
                nn.Conv2d(channels, 2 * channels, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * channels), nn.LeakyReLU(0.2, inplace=True),
            ]
            channels *= 2
        self.body = nn.Sequential(*layers)
        self.out_channels = channels  # of `features`
        kernel, padding = (bottom, 0) if flat else (3, 1)
        self.latent = nn.Conv2d(channels, latent_channels, kernel, 1, padding, bias=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.latent(self.body(images))


class ConvDecoder(nn.Module):
    """The mirror of `ConvEncoder`: latents -> B x `out_channels` x S x S, through `output`
    ("sigmoid" for images in [0, 1], "tanh" for [-1, 1], "none")."""

    def __init__(
        self, image_size: int, latent_channels: int, out_channels: int = 3, width: int = 64,
        depth: int = 4, flat: bool = True, output: str = "sigmoid",
    ) -> None:
        super().__init__()
        if output not in ("sigmoid", "tanh", "none"):
            raise UserInputError(f"the decoder's output must be sigmoid, tanh or none, got {output}")
        bottom = bottom_side(image_size, depth)
        channels = width * 2 ** (depth - 1)
        kernel, padding = (bottom, 0) if flat else (3, 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_channels, channels, kernel, 1, padding, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
        ]
        for _ in range(depth - 1):
            layers += [
                nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2), nn.ReLU(inplace=True),
            ]
            channels //= 2
        layers.append(nn.ConvTranspose2d(channels, out_channels, 4, 2, 1, bias=False))
        if output != "none":
            layers.append(nn.Sigmoid() if output == "sigmoid" else nn.Tanh())
        self.body = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.body(latents)


class ConvAutoencoder(nn.Module):
    """`ConvEncoder` -> `ConvDecoder` with the same geometry; images in [0, 1] by default."""

    def __init__(
        self, image_size: int, latent_channels: int, channels: int = 3, width: int = 64,
        depth: int = 4, flat: bool = True, output: str = "sigmoid",
    ) -> None:
        super().__init__()
        self.encoder = ConvEncoder(image_size, latent_channels, channels, width, depth, flat)
        self.decoder = ConvDecoder(image_size, latent_channels, channels, width, depth, flat, output)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(images))
