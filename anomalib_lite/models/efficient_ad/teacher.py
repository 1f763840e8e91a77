"""EfficientAD's PDN teacher, distilled here from the configured pretrained backbone.

The authors distil their PDN once, on ImageNet, from WideResNet-101 (`pretraining.py` in
nelson1425/EfficientAD) and ship the weights; neither the weights nor ImageNet can be downloaded
here. This module repeats their recipe with what is at hand, and caches the result
(`components.teacher_artefact`): the first run builds it, later runs with the same inputs reuse it.

Target descriptor (the authors' recipe, any timm backbone): the backbone's features at two levels
(WRN-101's layer2 and layer3 there; levels 2 and 3 here, the same strides 8 and 16) of the image at
twice the PDN's input size; every position's 3 x 3 neighbourhood flattened (channel-major), each
level's vector average-pooled to 1024 values, the deeper level upsampled (bilinear) to the finer
grid, both concatenated and average-pooled to the PDN's 384 channels; standardised per channel
over the first images. The PDN (padded while distilling, so its grid is the descriptor's: 1/4 of
its input) regresses it by MSE, Adam 1e-4, weight decay 1e-5; 10 % of the images grey.

Images: any folder (`images`; the authors: ImageNet's training set; the project's benchmarks:
`dtd_subset`, 1,200 texture photographs), or the package's procedural textures when none is given,
resized to the PDN's input size. Steps and batch size are knobs: the authors run 60,000 steps of 16
on a GPU; the run logs what was used and how long it took, and the artefact records it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.data.anomaly_sources import AnomalySource, anomaly_source
from anomalib_lite.models.components import FeatureExtractor
from anomalib_lite.models.components.teacher_artefact import (
    folder_fingerprint,
    load_or_build,
    load_pretrained,
    time_to_go,
)
from anomalib_lite.models.efficient_ad.torch_model import patch_description_network

log = logging.getLogger(__name__)


class BackboneDescriptor(nn.Module):
    """Images in [0, 1] -> B x `out_channels` x h x w at the first level's grid (see the module doc)."""

    def __init__(self, backbone: Mapping[str, Any], levels: Sequence[int] = (2, 3), level_dim: int = 1024, out_channels: int = 384) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(levels=levels, **dict(backbone))
        self.levels, self.level_dim, self.out_channels = list(levels), level_dim, out_channels

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.extractor(images)
        grid = features[self.levels[0]].shape[-2:]
        pooled = []
        for level in self.levels:
            feature = features[level].contiguous()
            batch, channels, height, width = feature.shape
            patches = F.unfold(feature, kernel_size=3, padding=1).view(batch, channels * 9, height, width)
            if (height, width) != tuple(grid):
                patches = F.interpolate(patches, size=grid, mode="bilinear")
            rows = patches.permute(0, 2, 3, 1).reshape(-1, 1, channels * 9)
            pooled.append(F.adaptive_avg_pool1d(rows, self.level_dim))
        descriptor = F.adaptive_avg_pool1d(torch.cat(pooled, dim=2), self.out_channels)
        return descriptor.view(images.shape[0], *grid, self.out_channels).permute(0, 3, 1, 2)


def _draw(source: AnomalySource, count: int, size: int, generator: torch.Generator, grey_probability: float) -> torch.Tensor:
    images = source.draw(count, size, size, generator)
    grey = torch.rand(count, generator=generator) < grey_probability
    if grey.any():
        images[grey] = (images[grey] * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand(-1, 3, -1, -1)
    return images


def distill(
    pdn: nn.Module,
    descriptor: BackboneDescriptor,
    source: AnomalySource,
    image_size: int,
    steps: int,
    batch_size: int,
    seed: int,
    normalization_images: int = 256,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    grey_probability: float = 0.1,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train `pdn` (padded) to regress `descriptor`'s standardised output, on `pdn`'s device.
    Returns a report."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = next(pdn.parameters()).device
    descriptor.to(device)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        images = _draw(source, batch_size, image_size, generator, grey_probability)
        target = descriptor(F.interpolate(images.to(device), scale_factor=2, mode="bilinear"))
        return images, target

    # Per-channel mean and std of the target (the authors: over 10,000 ImageNet images).
    sums, squares, count = 0.0, 0.0, 0
    while count < normalization_images:
        _, target = batch()
        sums = sums + target.double().mean(dim=(2, 3)).sum(0)
        squares = squares + target.double().pow(2).mean(dim=(2, 3)).sum(0)
        count += len(target)
    mean = (sums / count).float().view(1, -1, 1, 1)
    std = (squares / count - (sums / count).pow(2)).clamp_min(1e-12).sqrt().float().view(1, -1, 1, 1)

    optimizer = torch.optim.Adam(pdn.parameters(), lr=lr, weight_decay=weight_decay)
    pdn.train()
    start, last_log, losses = time.perf_counter(), time.perf_counter(), []
    for step in range(1, steps + 1):
        images, target = batch()
        inputs = normalize(images) if normalize is not None else images
        prediction = pdn(inputs.to(device))
        loss = (prediction - (target - mean) / std).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if time.perf_counter() - last_log > 30 or step == steps:
            last_log = time.perf_counter()
            log.info("teacher distillation: step %d/%d, loss %.4f (mean of the last 50), %.0f s, %s",
                     step, steps, sum(losses[-50:]) / len(losses[-50:]), last_log - start,
                     time_to_go(step, steps, last_log - start))
    pdn.eval()
    return {"steps": steps, "batch_size": batch_size, "image_size": image_size, "images": source.describe(),
            "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 5)}


def load_or_distill_teacher(
    teacher: nn.Module,
    model_size: str,
    out_channels: int,
    backbone: Mapping[str, Any],
    images: str | None,
    cache_dir: str,
    levels: Sequence[int] = (2, 3),
    image_size: int = 256,
    steps: int = 60000,
    batch_size: int = 16,
    seed: int = 0,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    pretrained: str | None = None,
) -> None:
    """Fill `teacher` (an unpadded PDN) with the cached distilled weights, distilling them first (on
    `device`) if no artefact exists for these inputs. The weights are shared with a padded PDN for
    training. `pretrained`: a published teacher's state dict (file or URL) instead of distilling."""
    if pretrained:
        load_pretrained(teacher, pretrained, cache_dir, "method.teacher.pretrained")
        return
    inputs = {
        "model_size": model_size, "out_channels": out_channels, "levels": list(levels), "image_size": image_size,
        "steps": steps, "batch_size": batch_size, "seed": seed,
        "backbone": {k: v for k, v in dict(backbone).items() if k in ("name", "weights", "mean", "std")},
        "images_fingerprint": folder_fingerprint(images),  # the contents, not the path: caches move between machines
    }

    def build(network: nn.Module) -> dict[str, Any]:
        padded = patch_description_network(out_channels, model_size, padding=True).to(next(network.parameters()).device)
        descriptor = BackboneDescriptor(backbone, levels, out_channels=out_channels)
        report = distill(padded, descriptor, anomaly_source(images), image_size, steps, batch_size, seed, normalize=normalize)
        network.load_state_dict(padded.state_dict())
        return report

    cheaper = (
        f"the authors' recipe is {steps} steps of {batch_size} (hours on a CPU, minutes on a GPU); a quick try distils "
        "20 steps (smoke=efficient_ad), fewer steps: method.teacher.steps=N, a published teacher: "
        "method.teacher.pretrained=<file or URL>"
    )
    load_or_build(teacher, cache_dir, f"efficient_ad_teacher_{model_size}", inputs, build, device, cheaper)
