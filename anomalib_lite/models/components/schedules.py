"""Learning-rate schedules the methods' configs refer to (those torch does not have as one class)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, MultiStepLR


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.08,
    start_ratio: float = 0.1,
    final_ratio: float = 1e-3,
) -> LambdaLR:
    """Linear warm-up from `start_ratio` x lr, then cosine decay to `final_ratio` x lr, over `total_steps`.

    The learning-rate schedule of the CFLOW-AD authors' code: warm-up over the first 2 of 25
    meta-epochs (a fraction of 0.08) from lr / 10 to the value the cosine has reached there,
    cosine to lr x 0.1^3 at the end. Here it runs per step over the whole run, however many
    epochs that is.
    """
    total_steps = max(1, total_steps)
    warmup_steps = warmup_fraction * total_steps

    def cosine(step: float) -> float:
        return final_ratio + (1 - final_ratio) * (1 + math.cos(math.pi * min(step / total_steps, 1.0))) / 2

    def factor(step: int) -> float:
        if step < warmup_steps:
            return start_ratio + (cosine(warmup_steps) - start_ratio) * step / warmup_steps
        return cosine(step)

    return LambdaLR(optimizer, factor)


def multistep_at_fractions(
    optimizer: torch.optim.Optimizer,
    total_epochs: int,
    fractions: tuple[float, ...] = (0.8, 0.9),
    gamma: float = 0.2,
) -> MultiStepLR:
    """torch's MultiStepLR with milestones at `fractions` of the run's epochs (per-epoch interval).

    The DRAEM authors' schedule (x0.2 at 80 % and 90 % of the epochs): it follows
    `method.epochs` (or `trainer.max_epochs`) instead of fixed epoch numbers.
    """
    milestones = sorted({max(1, round(fraction * total_epochs)) for fraction in fractions})
    return MultiStepLR(optimizer, milestones=milestones, gamma=gamma)


def multistep_at_step_fractions(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    fractions: tuple[float, ...] = (0.95,),
    gamma: float = 0.1,
) -> MultiStepLR:
    """MultiStepLR with milestones at `fractions` of the run's optimiser steps (`interval: step`).

    EfficientAD's schedule (x0.1 after 95 % of the steps), whatever the number of epochs.
    """
    milestones = sorted({max(1, round(fraction * total_steps)) for fraction in fractions})
    return MultiStepLR(optimizer, milestones=milestones, gamma=gamma)


def cosine(optimizer: torch.optim.Optimizer, total_steps: int, final_ratio: float = 0.0) -> CosineAnnealingLR:
    """torch's cosine annealing from lr to `final_ratio` x lr over the whole run (`interval: step`)."""
    base = optimizer.param_groups[0]["lr"]
    return CosineAnnealingLR(optimizer, T_max=max(1, total_steps), eta_min=final_ratio * base)
