"""Uninformed Students' patch descriptor networks and their dense evaluation.

One network per patch size p in {17, 33, 65} (the paper's supplementary architectures): a p x p
patch -> a d-dimensional descriptor, LeakyReLU(0.005) between layers, no padding. Teachers and
students share the architecture.

Dense output: the paper needs a descriptor for every pixel and gets it with fast dense feature
extraction (Bailer et al.: strided pooling replaced by multi-pooling, then unwarping). Here the
equivalent dilated network gives the same values: every 2 x 2 stride-2 max pooling becomes a
stride-1 pooling, and every later layer's dilation doubles. The image is padded by p // 2 (reflect)
so that output (y, x) is the patch network on the p x p patch centred on pixel (y, x); the test
checks that equality position by position.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.errors import UserInputError

# (kind, out_channels, kernel): "conv" layers are followed by a LeakyReLU except the last one.
ARCHITECTURES: dict[int, list[tuple[str, int, int]]] = {
    17: [("conv", 128, 6), ("conv", 256, 5), ("conv", 256, 5), ("conv", -1, 4)],
    33: [("conv", 128, 5), ("pool", 0, 2), ("conv", 256, 5), ("pool", 0, 2), ("conv", 256, 2), ("conv", -1, 4)],
    65: [
        ("conv", 128, 5), ("pool", 0, 2), ("conv", 128, 5), ("pool", 0, 2), ("conv", 128, 5), ("pool", 0, 2),
        ("conv", 256, 4), ("conv", -1, 1),
    ],
}
LEAKY_SLOPE = 5e-3


class PatchDescriptor(nn.Module):
    """p x p patches -> B x d descriptors (`forward`), or images -> B x d x H x W (`dense`)."""

    def __init__(self, patch_size: Literal[17, 33, 65], descriptor_dim: int = 128) -> None:
        super().__init__()
        if patch_size not in ARCHITECTURES:
            raise UserInputError(f"patch sizes are {sorted(ARCHITECTURES)} (the paper's networks), got {patch_size}")
        self.patch_size, self.descriptor_dim = patch_size, descriptor_dim
        self.layout = ARCHITECTURES[patch_size]
        convs, channels = [], 3
        for kind, out_channels, kernel in self.layout:
            if kind == "conv":
                out_channels = descriptor_dim if out_channels == -1 else out_channels
                convs.append(nn.Conv2d(channels, out_channels, kernel))
                channels = out_channels
        self.convs = nn.ModuleList(convs)

    def _run(self, x: torch.Tensor, dense: bool) -> torch.Tensor:
        dilation, conv_index = 1, 0
        last_conv = len(self.convs) - 1
        for kind, _, kernel in self.layout:
            if kind == "pool":
                x = F.max_pool2d(x, kernel, stride=1, dilation=dilation) if dense else F.max_pool2d(x, kernel, stride=kernel)
                dilation *= kernel if dense else 1
                continue
            conv = self.convs[conv_index]
            x = F.conv2d(x, conv.weight, conv.bias, dilation=dilation)
            if conv_index < last_conv:
                x = F.leaky_relu(x, LEAKY_SLOPE)
            conv_index += 1
        return x

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """B x 3 x p x p -> B x d (the network's single output position)."""
        if patches.shape[-2:] != (self.patch_size, self.patch_size):
            raise ValueError(f"expected {self.patch_size} x {self.patch_size} patches, got {tuple(patches.shape[-2:])}")
        return self._run(patches, dense=False).flatten(1)

    def pad(self, images: torch.Tensor) -> torch.Tensor:
        """Reflect-pad so that every pixel is the centre of a full patch."""
        before, after = self.patch_size // 2, self.patch_size - 1 - self.patch_size // 2
        return F.pad(images, (before, after, before, after), mode="reflect")

    def dense(self, images: torch.Tensor, padded: bool = False) -> torch.Tensor:
        """B x 3 x H x W -> B x d x H x W: the descriptor of the patch centred on every pixel.
        `padded`: the images already carry `pad`'s border (H, W then mean the inner size)."""
        source = images if padded else self.pad(images)
        height = source.shape[-2] - self.patch_size + 1
        width = source.shape[-1] - self.patch_size + 1
        # Channels-last: the full-resolution dilated convolutions run about 1.5 x faster on a CPU.
        dense = self._run(source.contiguous(memory_format=torch.channels_last), dense=True)
        # The pools' floor drops a patch's last rows: the dilated output may be a little larger.
        return dense[..., :height, :width]
