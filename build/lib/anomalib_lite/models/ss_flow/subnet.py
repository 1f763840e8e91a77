"""Coupling subnets for the self-supervised flow: convolution and self-attention, residual."""

from __future__ import annotations

import torch
from torch import nn


class ConvAttentionSubnet(nn.Module):
    """conv3x3 in -> [residual conv block, residual self-attention block] x depth -> conv1x1 out.

    Convolutions see the local texture; self-attention over all positions of the map lets a
    coupling compare a position with the rest of the image (a pasted patch is "wrong" mostly in
    relation to its surroundings). The output convolution starts at zero, so every coupling
    starts as the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, heads: int = 4, depth: int = 1) -> None:
        super().__init__()
        heads = max(1, min(heads, hidden_channels))
        while hidden_channels % heads:
            heads -= 1
        self.stem = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            nn.Sequential(
                nn.GELU(),
                nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
            )
            for _ in range(depth)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_channels) for _ in range(depth))
        self.attentions = nn.ModuleList(
            nn.MultiheadAttention(hidden_channels, heads, batch_first=True) for _ in range(depth)
        )
        self.head = nn.Conv2d(hidden_channels, out_channels, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        batch, channels, height, width = h.shape
        for conv, norm, attention in zip(self.conv_blocks, self.norms, self.attentions):
            h = h + conv(h)
            tokens = norm(h.flatten(2).transpose(1, 2))  # B x (h*w) x C
            attended, _ = attention(tokens, tokens, tokens, need_weights=False)
            h = h + attended.transpose(1, 2).reshape(batch, channels, height, width)
        return self.head(h)


def conv_attention_subnet(hidden_ratio: float = 1.0, heads: int = 4, depth: int = 1):
    """A FrEIA subnet constructor (in_channels, out_channels) -> ConvAttentionSubnet."""

    def build(in_channels: int, out_channels: int) -> nn.Module:
        return ConvAttentionSubnet(in_channels, out_channels, max(8, int(in_channels * hidden_ratio)), heads, depth)

    return build
