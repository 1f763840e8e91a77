"""Uninformed Students' teachers: one patch descriptor network per patch size, distilled here.

The paper pretrains each teacher on ImageNet patches against a pretrained ResNet-18's 512-d
descriptor, with three losses weighted 1:1:1 by default (section 3.1):
- knowledge distillation: a fully connected decoder maps the d-dim descriptor to the backbone's;
  the squared error to the backbone's descriptor of the patch (here averaged over its dimensions,
  after standardising them over the first batches, so the three terms start on one scale, and
  leaving out the dimensions that are constant over those batches);
- metric learning: triplets (p, p+, p-) with p+ the same image region moved by a few pixels,
  brightness changed and Gaussian noise added, p- a patch of another image; with the squared
  distances d+ = |T(p) - T(p+)|^2 and d- = min(|T(p) - T(p-)|^2, |T(p+) - T(p-)|^2),
  max(0, margin + d+ - d-);
- descriptor compactness: the off-diagonal entries of the descriptors' correlation matrix over
  the minibatch, to decorrelate the dimensions. The paper writes their plain sum (`compactness:
  signed`). The default, `squared`, takes the mean of their squares (the decorrelation term of descriptor
  learning, as in L2-Net's compactness constraint), averaged like the distillation term so that
  weight 1 keeps the terms on one scale (summed, the squares were ~1,100 against a distillation
  error of ~1.2). Signed, the sum has a floor of -d (the correlation matrix is positive
  semi-definite) that a teacher reaches within a hundred steps by anti-correlating its
  dimensions, and it then outweighs the distillation term 100 : 1 (measured: -127.9 at d = 128
  after 125 steps of 32 patches, distillation error still 1.3).

Here: the configured backbone (offline lite0) stands in for ResNet-18 (its globally pooled
descriptor of the patch, upsampled to `backbone_input` px), and the images are a folder's
(`images`: the benchmarks use `dtd_subset`, 1,200 texture photographs; ImageNet in the paper) or
the package's procedural textures: not the training images, so one teacher serves every dataset.
The artefact is cached (`components.teacher_artefact`) per recipe.

Not from the paper (its text was not at hand when this was written; to be checked against it):
the learning rate 2e-4, the margin 1, the positive's shift (up to p / 16 px), brightness (+-10 %)
and noise (sigma 0.02), and the backbone's input size. They are arguments, recorded in the
artefact's recipe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalib_lite.data.anomaly_sources import AnomalySource, anomaly_source
from anomalib_lite.models.components import ImageEncoder
from anomalib_lite.models.components.teacher_artefact import (
    folder_fingerprint,
    load_or_build,
    load_pretrained,
    time_to_go,
)
from anomalib_lite.models.uninformed_students.patch_network import PatchDescriptor

log = logging.getLogger(__name__)

# Bumped when `distill` changes what it builds, so cached teachers of an older recipe are rebuilt.
DISTILLATION_RECIPE = 3  # 3: the teacher itself trains (before, only the decoder did)


def compactness_loss(descriptors: torch.Tensor, form: str = "squared") -> torch.Tensor:
    """B x d -> over the off-diagonal entries of the d x d correlation matrix over the batch: the
    mean of their squares (`squared`) or the sum of the entries (`signed`, the paper's formula)."""
    correlation = torch.corrcoef(descriptors.T)
    if form == "squared":
        dim = correlation.shape[0]
        return (correlation.pow(2).sum() - correlation.diagonal().pow(2).sum()) / (dim * (dim - 1))
    if form == "signed":
        return correlation.sum() - correlation.diagonal().sum()
    raise ValueError(f"compactness must be 'squared' or 'signed', got {form!r}")


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """The paper's triplet loss with the harder of the two negative distances (squared L2)."""
    positive_distance = (anchor - positive).pow(2).sum(dim=1)
    negative_distance = torch.minimum((anchor - negative).pow(2).sum(dim=1), (positive - negative).pow(2).sum(dim=1))
    return F.relu(margin + positive_distance - negative_distance).mean()


def _patches(images: torch.Tensor, size: int, generator: torch.Generator, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One random size x size patch per image, and the same region moved by up to `shift` px."""
    count, _, height, width = images.shape
    anchors, positives = [], []
    for image in images:
        top = int(torch.randint(shift, height - size - shift + 1, (), generator=generator))
        left = int(torch.randint(shift, width - size - shift + 1, (), generator=generator))
        dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=generator))
        anchors.append(image[:, top : top + size, left : left + size])
        positives.append(image[:, top + dy : top + dy + size, left + dx : left + dx + size])
    return torch.stack(anchors), torch.stack(positives)


def distill(
    teacher: PatchDescriptor,
    encoder: ImageEncoder,
    source: AnomalySource,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    steps: int,
    batch_size: int = 64,
    image_size: int = 256,
    backbone_input: int = 128,
    weights: Mapping[str, float] | None = None,
    margin: float = 1.0,
    lr: float = 2e-4,
    weight_decay: float = 1e-5,
    seed: int = 0,
    compactness: str = "squared",
) -> dict[str, Any]:
    """Train `teacher` with the paper's three losses, on `teacher`'s device; returns a report."""
    weights = {"distillation": 1.0, "triplet": 1.0, "compactness": 1.0, **(weights or {})}
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    size = teacher.patch_size
    shift = max(1, size // 16)
    device = next(teacher.parameters()).device
    encoder.to(device).eval().requires_grad_(False)

    def target(patches: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return encoder(F.interpolate(patches.to(device), size=backbone_input, mode="bilinear"))

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        images = source.draw(batch_size, image_size, image_size, generator)
        anchor, positive = _patches(images, size, generator, shift)
        brightness = 1 + 0.1 * (2 * torch.rand(len(positive), 1, 1, 1, generator=generator) - 1)
        positive = (positive * brightness + 0.02 * torch.randn(positive.shape, generator=generator)).clamp(0, 1)
        return anchor, positive

    # The backbone descriptor's per-dimension mean and std, over the first batches.
    samples = torch.cat([target(draw()[0]) for _ in range(max(1, 256 // batch_size))])
    # Dimensions (nearly) constant over these batches (dead ReLUs) carry nothing to distil, and
    # standardising them would blow their error up by orders of magnitude on later patches.
    mean, std = samples.mean(dim=0), samples.std(dim=0)
    kept = std > 1e-3 * std.max()
    mean, std = mean[kept], std[kept]
    decoder = nn.Linear(teacher.descriptor_dim, int(kept.sum())).to(device)
    # The model keeps its teachers frozen; they learn here only.
    teacher.train().requires_grad_(True)
    optimizer = torch.optim.Adam([*teacher.parameters(), *decoder.parameters()], lr=lr, weight_decay=weight_decay)
    start, last_log, history = time.perf_counter(), time.perf_counter(), []
    for step in range(1, steps + 1):
        anchor, positive = draw()
        d_anchor, d_positive = teacher(normalize(torch.cat([anchor, positive])).to(device)).chunk(2)
        d_negative = d_anchor.roll(1, dims=0)  # negatives: another image's patch, already described
        terms = {
            "distillation": (decoder(d_anchor) - (target(anchor)[:, kept] - mean) / std).pow(2).mean(),
            "triplet": triplet_loss(d_anchor, d_positive, d_negative, margin),
            "compactness": compactness_loss(d_anchor, compactness),
        }
        loss = sum(weights[name] * value for name, value in terms.items() if weights[name])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append([value.item() for value in terms.values()])
        if time.perf_counter() - last_log > 30 or step == steps:
            last_log = time.perf_counter()
            recent = torch.tensor(history[-50:]).mean(dim=0).tolist()
            log.info("p=%d teacher: step %d/%d, %s, %.0f s, %s", size, step, steps,
                     ", ".join(f"{name} {value:.4f}" for name, value in zip(terms, recent)), last_log - start,
                     time_to_go(step, steps, last_log - start))
    teacher.eval().requires_grad_(False)
    final = torch.tensor(history[-50:]).mean(dim=0).tolist()
    return {"steps": steps, "batch_size": batch_size, "images": source.describe(),
            **{f"final_{name}": round(value, 5) for name, value in zip(("distillation", "triplet", "compactness"), final)}}


def load_or_distill_teachers(
    teachers: nn.ModuleList,
    backbone: Mapping[str, Any],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    images: str | None,
    cache_dir: str,
    steps: int = 50000,
    batch_size: int = 64,
    image_size: int = 256,
    backbone_input: int = 128,
    weights: Mapping[str, float] | None = None,
    margin: float = 1.0,
    seed: int = 0,
    compactness: str = "squared",
    device: torch.device | str | None = None,
    pretrained: Mapping[int, str] | None = None,
) -> None:
    """Fill every teacher from its cached artefact, distilling the missing ones first (on `device`).
    `pretrained`: patch size -> a published teacher's state dict (file or URL), used instead."""
    encoder: ImageEncoder | None = None
    for teacher in teachers:
        source = {int(k): v for k, v in (pretrained or {}).items()}.get(teacher.patch_size)
        if source:
            load_pretrained(teacher, source, cache_dir, f"method.teacher.pretrained.{teacher.patch_size}")
            continue
        inputs = {
            "recipe": DISTILLATION_RECIPE, "patch_size": teacher.patch_size, "descriptor_dim": teacher.descriptor_dim, "steps": steps,
            "batch_size": batch_size, "image_size": image_size, "backbone_input": backbone_input,
            "weights": dict(weights or {}), "margin": margin, "seed": seed, "compactness": compactness,
            "backbone": {k: v for k, v in dict(backbone).items() if k in ("name", "weights", "mean", "std")},
            "images_fingerprint": folder_fingerprint(images),  # the contents, not the path: caches move between machines
        }

        def build(network: nn.Module) -> dict[str, Any]:
            nonlocal encoder
            encoder = encoder or ImageEncoder(**dict(backbone))
            return distill(network, encoder, anomaly_source(images), normalize, steps, batch_size, image_size,
                           backbone_input, weights, margin, seed=seed, compactness=compactness)

        cheaper = (
            f"the paper's teacher is {steps} steps per patch size (hours on a CPU); a quick try distils 10 steps at one "
            "patch size (smoke=uninformed_students), fewer steps: method.teacher.steps=N, published teachers: "
            "method.teacher.pretrained={17: <file or URL>, ...}"
        )
        load_or_build(teacher, cache_dir, f"uninformed_students_teacher_p{teacher.patch_size}", inputs, build, device, cheaper)
