"""CS-Flow's cross-scale coupling block (FrEIA has couplings for one tensor only).

The block transforms three feature maps of one image (the same backbone level at three input
scales) together: an affine coupling per scale whose scales and shifts come from one subnet that
sees all three scales, exchanging information through up- and down-sampling convolutions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import nn


class CrossScaleSubnet(nn.Module):
    """Three scale streams: conv -> leaky ReLU -> conv per scale, plus each stream's hidden map
    sent to its neighbours (finer: bilinear upsampling then conv; coarser: strided conv).

    The outputs are multiplied by learnable gains initialised to zero, so every coupling starts
    as the identity (a stable start for deep flows).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, kernel_size: int) -> None:
        super().__init__()
        padding = kernel_size // 2

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding)

        self.inputs = nn.ModuleList(conv(in_channels, hidden_channels) for _ in range(3))
        self.outputs = nn.ModuleList(conv(hidden_channels, out_channels) for _ in range(3))
        self.from_coarser = nn.ModuleList(conv(hidden_channels, out_channels) for _ in range(2))  # 1->0, 2->1
        self.from_finer = nn.ModuleList(conv(hidden_channels, out_channels, stride=2) for _ in range(2))  # 0->1, 1->2
        self.gains = nn.Parameter(torch.zeros(3))
        self.activation = nn.LeakyReLU(0.1)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        hidden = [self.activation(conv(x)) for conv, x in zip(self.inputs, maps)]
        out = [conv(h) for conv, h in zip(self.outputs, hidden)]
        for scale in range(2):
            coarse, fine = hidden[scale + 1], hidden[scale]
            # Sizes need not halve exactly (e.g. 14 -> 7 -> 4): resample onto the target grid.
            up = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
            out[scale] = out[scale] + self.from_coarser[scale](up)
            down = self.from_finer[scale](fine)
            if down.shape[-2:] != out[scale + 1].shape[-2:]:
                down = F.interpolate(down, size=out[scale + 1].shape[-2:], mode="bilinear", align_corners=False)
            out[scale + 1] = out[scale + 1] + down
        return [gain * o for gain, o in zip(self.gains, out)]


class CrossScaleCoupling(Fm.InvertibleModule):
    """Affine coupling on three maps at once (GLOW-style: both channel halves are transformed).

    Each map is split into halves (a, b). a' = a * exp(s1) + t1 with (s1, t1) from the subnet on
    all three b's; then b' = b * exp(s2) + t2 with (s2, t2) from a second subnet on all a''s.
    Scales are soft-clamped, s = clamp * 0.636 * atan(s_raw / clamp), as FrEIA's GLOW block does.
    """

    def __init__(
        self,
        dims_in: Sequence[tuple[int, ...]],
        dims_c: Sequence[tuple[int, ...]] | None = None,
        hidden_channels: int = 1024,
        kernel_size: int = 3,
        clamp: float = 3.0,
    ) -> None:
        super().__init__(dims_in, dims_c)
        channels = {dims[0] for dims in dims_in}
        if len(dims_in) != 3 or len(channels) != 1:
            raise ValueError(f"cross-scale coupling needs three inputs with equal channels, got {dims_in}")
        total = channels.pop()
        self.split = (total // 2, total - total // 2)
        self.clamp = clamp
        self.subnet_a = CrossScaleSubnet(self.split[1], 2 * self.split[0], hidden_channels, kernel_size)
        self.subnet_b = CrossScaleSubnet(self.split[0], 2 * self.split[1], hidden_channels, kernel_size)

    def _soft_clamp(self, s: torch.Tensor) -> torch.Tensor:
        return self.clamp * 0.636 * torch.atan(s / self.clamp)

    def _affine_parameters(
        self, subnet: CrossScaleSubnet, conditions: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        parameters = []
        for out in subnet(conditions):
            log_scale, shift = out.chunk(2, dim=1)
            parameters.append((self._soft_clamp(log_scale), shift))
        return parameters

    def forward(
        self, x_or_z: Iterable[torch.Tensor], c: Iterable[torch.Tensor] | None = None, rev: bool = False, jac: bool = True
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        halves = [torch.split(x, self.split, dim=1) for x in x_or_z]
        a, b = [h[0] for h in halves], [h[1] for h in halves]
        log_det = a[0].new_zeros(a[0].shape[0])
        if not rev:
            params = self._affine_parameters(self.subnet_a, b)
            a = [x * torch.exp(s) + t for x, (s, t) in zip(a, params)]
            log_det = log_det + sum(s.flatten(1).sum(1) for s, _ in params)
            params = self._affine_parameters(self.subnet_b, a)
            b = [x * torch.exp(s) + t for x, (s, t) in zip(b, params)]
            log_det = log_det + sum(s.flatten(1).sum(1) for s, _ in params)
        else:
            params = self._affine_parameters(self.subnet_b, a)
            b = [(x - t) * torch.exp(-s) for x, (s, t) in zip(b, params)]
            log_det = log_det - sum(s.flatten(1).sum(1) for s, _ in params)
            params = self._affine_parameters(self.subnet_a, b)
            a = [(x - t) * torch.exp(-s) for x, (s, t) in zip(a, params)]
            log_det = log_det - sum(s.flatten(1).sum(1) for s, _ in params)
        return tuple(torch.cat(pair, dim=1) for pair in zip(a, b)), log_det

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return input_dims
