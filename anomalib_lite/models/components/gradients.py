"""Autograd at test time, for methods whose scoring itself optimises (AnoGAN's latent search,
GradCon's gradient term): Lightning's evaluation loops and `predict` run in inference mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def gradients_enabled() -> Iterator[None]:
    """Autograd on inside inference mode and `no_grad`. A tensor made in inference mode (the
    loader's images) enters autograd only as a copy made inside this context (`.clone()`)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield
