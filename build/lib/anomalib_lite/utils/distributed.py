"""Gathering per-sample results across DDP ranks, without the sampler's padding duplicates."""

from __future__ import annotations

import lightning as L
import torch


def gather_samples(
    module: L.LightningModule, tensors: dict[str, torch.Tensor], index: torch.Tensor, keep_index: bool = False
) -> dict[str, torch.Tensor]:
    """Every rank's rows of `tensors`, one row per dataset `index`, ordered by index
    (with `keep_index`, the sorted indices come back under the key "index").

    DistributedSampler pads the last rank with repeats of the first samples; dropping the repeats
    and sorting by index gives exactly what a single process would have seen, in the same order.
    """
    trainer = module._trainer
    if trainer is not None and trainer.world_size > 1:
        # all_gather needs the module's device (NCCL: GPU); results go back where they came from.
        index = module.all_gather(index.to(module.device)).flatten().to(index.device)
        tensors = {k: module.all_gather(v.to(module.device)).flatten(0, 1).to(v.device) for k, v in tensors.items()}
    index = index.to(next(iter(tensors.values())).device) if tensors else index
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    keep = order[first]
    result = {key: value[keep] for key, value in tensors.items()}
    if keep_index:
        result["index"] = index[keep]
    return result
