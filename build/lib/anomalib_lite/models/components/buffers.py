"""Buffers whose size is only known after fitting (memory banks, Gaussian statistics)."""

from __future__ import annotations

import torch
from torch import nn


class ResizableBuffersMixin(nn.Module):
    """Resize the listed buffers to the checkpoint's shapes before loading it.

    A fitted model's buffers (e.g. a memory bank of N x D) are empty in a freshly built model;
    without this, `load_state_dict` of a checkpoint fails on the shape mismatch.
    """

    resizable_buffers: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        for name in self.resizable_buffers:
            key = prefix + name
            if key in state_dict:
                current: torch.Tensor = getattr(self, name)
                setattr(self, name, torch.empty_like(state_dict[key], device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
