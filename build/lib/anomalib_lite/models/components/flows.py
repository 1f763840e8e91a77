"""Normalizing-flow pieces shared by the flow methods, built from FrEIA's coupling blocks.

- `conv_flow`: an invertible flow on C x H x W feature maps (FastFlow's 2D flow), optionally
  conditioned on a C' x H x W map (FrEIA concatenates conditions to the subnet input).
- `vector_flow`: an invertible flow on C-dim vectors conditioned on a vector (CFLOW-AD's decoder).
- `positional_encoding_2d`: the sinusoidal 2D position code CFLOW-AD conditions on.
- `gaussian_log_likelihood`: log p(x) = log N(z; 0, I) + log|det dz/dx|, per sample.

All couplings are FrEIA `AllInOneBlock`s (affine coupling + soft clamping + a global affine
scaling + a fixed random channel permutation per block).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn

SubnetConstructor = Callable[[int, int], nn.Module]

_LOG_2PI = math.log(2 * math.pi)


def conv_subnet(kernel_size: int, hidden_ratio: float = 1.0) -> SubnetConstructor:
    """Subnet conv(k) -> ReLU -> conv(k) (FastFlow's, with `hidden_ratio` x the input channels)."""

    def build(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(1, int(in_channels * hidden_ratio))
        padding = kernel_size // 2
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size, padding=padding),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, kernel_size, padding=padding),
        )

    return build


def fc_subnet(hidden_ratio: float = 2.0) -> SubnetConstructor:
    """Subnet linear -> ReLU -> linear (CFLOW-AD's, hidden = 2 x the input width)."""

    def build(in_features: int, out_features: int) -> nn.Module:
        hidden = max(1, int(in_features * hidden_ratio))
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

    return build


def conv_flow(
    shape: Sequence[int],
    subnets: Sequence[SubnetConstructor],
    clamp: float = 2.0,
    condition_shape: Sequence[int] | None = None,
) -> Ff.SequenceINN:
    """A flow on C x H x W maps: one AllInOneBlock per subnet constructor (in order)."""
    flow = Ff.SequenceINN(*shape)
    for subnet in subnets:
        flow.append(
            Fm.AllInOneBlock,
            cond=0 if condition_shape is not None else None,
            cond_shape=tuple(condition_shape) if condition_shape is not None else None,
            subnet_constructor=subnet,
            affine_clamping=clamp,
            permute_soft=False,
        )
    return flow


def vector_flow(
    dim: int, condition_dim: int, steps: int, clamp: float = 1.9, hidden_ratio: float = 2.0, permute_soft: bool = False
) -> Ff.SequenceINN:
    """A conditional flow on `dim`-vectors, `steps` AllInOneBlocks with fully connected subnets."""
    flow = Ff.SequenceINN(dim)
    for _ in range(steps):
        flow.append(
            Fm.AllInOneBlock,
            cond=0,
            cond_shape=(condition_dim,),
            subnet_constructor=fc_subnet(hidden_ratio),
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=permute_soft,
        )
    return flow


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """channels x height x width sinusoidal code: first half encodes x, second half y.

    In each half, channel pairs (2i, 2i+1) hold sin / cos of position * 10000^(-4i / channels)
    (the Transformer code per axis, as CFLOW-AD uses it).
    """
    if channels % 4:
        raise ValueError(f"positional encoding needs channels divisible by 4, got {channels}")
    half = channels // 2
    frequencies = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * -(math.log(10000.0) / half))
    x = torch.arange(width, dtype=torch.float64)[:, None] * frequencies  # W x half/2
    y = torch.arange(height, dtype=torch.float64)[:, None] * frequencies  # H x half/2
    encoding = torch.zeros(channels, height, width, dtype=torch.float64)
    encoding[0:half:2] = torch.sin(x).T[:, None, :].expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(x).T[:, None, :].expand(-1, height, -1)
    encoding[half::2] = torch.sin(y).T[:, :, None].expand(-1, -1, width)
    encoding[half + 1 :: 2] = torch.cos(y).T[:, :, None].expand(-1, -1, width)
    return encoding.float()


def gaussian_log_likelihood(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """Per-sample log-likelihood of x = f^-1(z) under a standard normal on z (in nats)."""
    flat = z.flatten(1)
    return -0.5 * (flat.pow(2).sum(dim=1) + flat.shape[1] * _LOG_2PI) + log_jac_det
