"""Loops over the batch in bounded memory when run, one block when traced or exported.

An exported graph (ONNX, OpenVINO, TorchScript) takes any batch size; a Python loop over the
batch, or over chunks of it, would be unrolled for the example's batch (TorchScript, OpenVINO) or
fix the batch to it (torch.export). Traced, such a loop becomes one block: the same sums, memory
that grows with the batch.
"""

from __future__ import annotations

import torch


def is_traced() -> bool:
    """True while TorchScript or OpenVINO traces the model, or torch.export captures it."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def batch_chunks(tensor: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """`tensor.split(size)` along its first axis when run; `(tensor,)` when traced or exported."""
    return (tensor,) if is_traced() else tensor.split(size)
