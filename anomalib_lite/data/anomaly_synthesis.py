"""Synthetic anomalies for self-supervised training and label-free validation, with exact masks.

Every synthesiser is a seeded callable `(images, sources=None) -> SyntheticAnomalies` on
B x 3 x H x W batches in [0, 1] (any device): the images with anomalies blended in, B x H x W masks
in {0, 1} marking exactly the blended pixels, and per image whether it has any. Methods draw their
training anomalies from here, never from test data; the validation view (`data.ValidationSet`)
draws its synthetic anomalies from the same classes.
- `CutBlendSynthesizer`: rectangles of another normal image blended in (`sources`: those images).
- `PerlinSynthesizer`: DRAEM's anomalies, Perlin-noise-shaped regions filled with an augmented
  texture (`anomaly_sources`), or with the image's own shuffled tiles (structure anomalies), and
  optionally kept on a foreground and off tiny regions (CPR's synthetic data).
- `CutPasteSynthesizer`: CutPaste's patches and scars, cut from the image itself and pasted elsewhere.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, NamedTuple

import kornia
import torch
import torchvision.transforms.v2.functional as TF
from scipy import ndimage

from anomalib_lite.data.anomaly_sources import AnomalySource, anomaly_source, augment_textures
from anomalib_lite.data.perlin import perlin_noise


class SyntheticAnomalies(NamedTuple):
    images: torch.Tensor  # B x 3 x H x W in [0, 1]
    masks: torch.Tensor  # B x H x W in {0, 1}: exactly the pixels that were changed
    has_anomaly: torch.Tensor  # B booleans: the mask is not empty


class SeededSynthesizer:
    """What every synthesiser shares: its own generator (`seed`, `reseed`) and uniform draws from it."""

    # The validation view passes another held-out image as `sources` when this is true.
    takes_image_sources = False

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.generator).item()

    def _integer(self, low: int, high: int) -> int:
        """Uniform integer in [low, high] (both included)."""
        return int(torch.randint(low, high + 1, (), generator=self.generator))


class CutBlendSynthesizer(SeededSynthesizer):
    """Cut random rectangles from a source image and blend them into the target image.

    For each image: `num_patches` rectangles (count drawn uniformly from the range), each with a
    side length drawn as a fraction of the image side, a random position in the source and an
    independent random position in the target, blended with an opacity drawn from `opacity`.
    The source of image i is normally another normal training image (`sources`); with
    `sources=None` the batch is rolled by one, so every image receives patches of its neighbour
    (a batch of one, e.g. one-shot training, receives patches moved within the same image).
    A patch moved within the same texture can be nearly invisible; that is intended (the
    self-supervised flow bounds the loss such samples can cause), but opacities start at 0.3 so
    every masked pixel really differs by a visible blend.
    """

    takes_image_sources = True

    def __init__(
        self,
        num_patches: tuple[int, int] = (1, 4),
        patch_fraction: tuple[float, float] = (0.05, 0.3),
        opacity: tuple[float, float] = (0.3, 1.0),
        seed: int = 0,
    ) -> None:
        low, high = num_patches
        if not 1 <= low <= high:
            raise ValueError(f"num_patches must be a range 1 <= low <= high, got {num_patches}")
        if not 0 < patch_fraction[0] <= patch_fraction[1] <= 1:
            raise ValueError(f"patch_fraction must be a range within (0, 1], got {patch_fraction}")
        if not 0 < opacity[0] <= opacity[1] <= 1:
            raise ValueError(f"opacity must be a range within (0, 1], got {opacity}")
        self.num_patches = (int(low), int(high))
        self.patch_fraction = (float(patch_fraction[0]), float(patch_fraction[1]))
        self.opacity = (float(opacity[0]), float(opacity[1]))
        super().__init__(seed)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, sources: torch.Tensor | None = None
    ) -> SyntheticAnomalies:
        if images.ndim != 4:
            raise ValueError(f"expected B x C x H x W images, got shape {tuple(images.shape)}")
        if sources is None:
            sources = images.roll(1, dims=0)
        if sources.shape != images.shape:
            raise ValueError(f"sources {tuple(sources.shape)} must have the images' shape {tuple(images.shape)}")
        batch, _, height, width = images.shape
        # Patches are pasted one after another; overlaps compose like sequential pastes.
        output = images.clone()
        masks = torch.zeros(batch, height, width, device=images.device)
        for index in range(batch):
            for _ in range(self._integer(*self.num_patches)):
                patch_h = max(1, round(height * self._uniform(*self.patch_fraction)))
                patch_w = max(1, round(width * self._uniform(*self.patch_fraction)))
                src_y, src_x = self._integer(0, height - patch_h), self._integer(0, width - patch_w)
                dst_y, dst_x = self._integer(0, height - patch_h), self._integer(0, width - patch_w)
                alpha = self._uniform(*self.opacity)
                patch = sources[index, :, src_y : src_y + patch_h, src_x : src_x + patch_w]
                region = output[index, :, dst_y : dst_y + patch_h, dst_x : dst_x + patch_w]
                region.mul_(1 - alpha).add_(alpha * patch)
                masks[index, dst_y : dst_y + patch_h, dst_x : dst_x + patch_w] = 1
        return SyntheticAnomalies(output, masks, masks.flatten(1).any(dim=1))


def perlin_mask(
    height: int,
    width: int,
    generator: torch.Generator,
    scale_exponents: tuple[int, int] = (0, 5),
    rotation: float = 90.0,
    threshold: float = 0.5,
) -> torch.Tensor:
    """DRAEM's anomaly shape: H x W in {0, 1}.

    Perlin noise of 2^a x 2^b lattice cells, a and b drawn independently from `scale_exponents`
    (both included: the authors' 0..5), rotated by U(-rotation, rotation) degrees about the centre
    (corners filled with 0, so they stay outside), then thresholded (`> threshold`).
    """
    low, high = scale_exponents
    rows = 2 ** int(torch.randint(low, high + 1, (), generator=generator))
    columns = 2 ** int(torch.randint(low, high + 1, (), generator=generator))
    noise = perlin_noise(height, width, (rows, columns), generator)
    angle = (torch.rand(1, generator=generator) * 2 - 1) * rotation
    if rotation:
        noise = kornia.geometry.transform.rotate(noise[None, None], angle, padding_mode="zeros")[0, 0]
    return (noise > threshold).float()


def prune_regions(mask: torch.Tensor, min_pixels: int = 0, foreground: torch.Tensor | None = None) -> torch.Tensor:
    """`mask` (H x W in {0, 1}) without its 8-connected regions of fewer than `min_pixels` pixels and,
    given a `foreground` (H x W in [0, 1]), without those that touch no pixel of it above 0.5."""
    labels, count = ndimage.label(mask.cpu().numpy() > 0, structure=[[1, 1, 1], [1, 1, 1], [1, 1, 1]])
    if count == 0:
        return mask
    labels = torch.from_numpy(labels).to(mask.device)
    sizes = torch.bincount(labels.flatten(), minlength=count + 1)
    keep = sizes >= min_pixels
    if foreground is not None:
        on_foreground = torch.bincount(labels.flatten(), weights=(foreground > 0.5).flatten().double().to(mask.device), minlength=count + 1)
        keep &= on_foreground > 0
    keep[0] = False
    return keep[labels].to(mask.dtype)


def shuffle_tiles(images: torch.Tensor, grid: int, generator: torch.Generator) -> torch.Tensor:
    """Each image cut into grid x grid tiles and the tiles put back in a random order (per image):
    the structure-anomaly source of MemSeg and CPR. The sides must be divisible by `grid`."""
    batch, channels, height, width = images.shape
    if height % grid or width % grid:
        raise ValueError(f"structure anomalies need image sides divisible by the grid {grid}, got {height} x {width}")
    tile_h, tile_w = height // grid, width // grid
    tiles = images.reshape(batch, channels, grid, tile_h, grid, tile_w).permute(0, 2, 4, 1, 3, 5).reshape(batch, grid * grid, channels, tile_h, tile_w)
    order = torch.stack([torch.randperm(grid * grid, generator=generator) for _ in range(batch)]).to(images.device)
    tiles = tiles[torch.arange(batch, device=images.device)[:, None], order]
    return tiles.reshape(batch, grid, grid, channels, tile_h, tile_w).permute(0, 3, 1, 4, 2, 5).reshape(images.shape)


def blend_anomaly(
    images: torch.Tensor, textures: torch.Tensor, masks: torch.Tensor, image_weight: torch.Tensor
) -> torch.Tensor:
    """I_a = (1 - M) I + (1 - w) M A + w M I, w = `image_weight` per image (B), masks B x H x W."""
    mask = masks.unsqueeze(1).to(images)
    weight = image_weight.view(-1, 1, 1, 1).to(images)
    return (1 - mask) * images + (1 - weight) * mask * textures + weight * mask * images


def rotate_images(
    images: torch.Tensor, generator: torch.Generator, probability: float = 0.3, degrees: float = 90.0
) -> torch.Tensor:
    """Each image rotated by U(-degrees, degrees) about its centre with probability `probability`
    (zero fill), as the DRAEM authors' training loader does to its normal images (30 %, +-90)."""
    if probability <= 0 or degrees == 0:
        return images
    chosen = torch.rand(len(images), generator=generator) < probability
    angles = (torch.rand(len(images), generator=generator) * 2 - 1) * degrees
    if not bool(chosen.any()):
        return images
    rotated = images.clone()
    on_device = chosen.to(images.device)
    rotated[on_device] = kornia.geometry.transform.rotate(
        images[on_device], angles[chosen].to(images), padding_mode="zeros"
    )
    return rotated


class PerlinSynthesizer(SeededSynthesizer):
    """DRAEM's simulated anomalies (Zavrtanik et al., ICCV 2021, section 3.3 and the authors' code).

    Per image: with probability 1 - `anomaly_probability` it is left as it is (empty mask; the
    authors' 0.5); otherwise a `perlin_mask` region is filled with a texture from `source` (a
    folder of images, or procedural textures when None; `anomaly_sources`), varied by
    `augmenters` distinct random augmenters, and blended in:
        I_a = (1 - M) I + (1 - beta) M A + beta M I
    - `blend="code"` (default, the authors' code): beta ~ U(`beta`), (0, 0.8): the texture's
      weight is 1 - beta, in [0.2, 1].
    - `blend="paper"` (eq. 2 of the paper): the texture weighted by beta ~ U(0.1, 1.0), the image
      by 1 - beta; `beta` is then the range of the texture's weight.
    `redraw_empty_masks`: an anomalous draw whose mask came out empty (the rotated noise stayed
    under the threshold) is drawn again (up to 20 times), so it really holds an anomaly; the
    validation view sets it, the authors' training keeps such images as normal ones.
    `sources` (optional, B x 3 x H x W) replaces the drawn, augmented textures (tests, callers
    with their own anomaly appearance).
    Training images are also rotated before synthesis (`rotate`, the authors' 30 % by +-90 deg).

    CPR's synthetic data (its authors' `generate_synthetic_data.py`) adds three options, off by default:
    - `structure_probability`: the chance that an anomalous image is filled with its own content,
      varied by `structure_augmenters` augmenters and shuffled in a `structure_grid`^2 tile grid,
      instead of a texture;
    - `min_region_fraction`: regions of the mask smaller than this fraction of the image are dropped;
    - `foreground` (an argument of the call, B x H x W in [0, 1]): regions touching no pixel above
      0.5 of it are dropped.
    A mask these rules empty is drawn again (up to 50 times; the authors' loop has no bound).
    """

    def __init__(
        self,
        source: str | Path | AnomalySource | None = None,
        anomaly_probability: float = 0.5,
        beta: tuple[float, float] = (0.0, 0.8),
        blend: Literal["code", "paper"] = "code",
        scale_exponents: tuple[int, int] = (0, 5),
        noise_rotation: float = 90.0,
        threshold: float = 0.5,
        augmenters: int = 3,
        rotate_probability: float = 0.3,
        rotate_degrees: float = 90.0,
        redraw_empty_masks: bool = False,
        structure_probability: float = 0.0,
        structure_grid: int = 16,
        structure_augmenters: int = 3,
        min_region_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0 <= structure_probability <= 1:
            raise ValueError(f"structure_probability must be in [0, 1], got {structure_probability}")
        if not 0 <= min_region_fraction < 1:
            raise ValueError(f"min_region_fraction must be in [0, 1), got {min_region_fraction}")
        if not 0 <= anomaly_probability <= 1:
            raise ValueError(f"anomaly_probability must be in [0, 1], got {anomaly_probability}")
        if not 0 <= beta[0] <= beta[1] <= 1:
            raise ValueError(f"beta must be a range within [0, 1], got {beta}")
        if blend not in ("code", "paper"):
            raise ValueError(f"blend must be 'code' or 'paper', got {blend!r}")
        if not 0 <= scale_exponents[0] <= scale_exponents[1]:
            raise ValueError(f"scale_exponents must be a range 0 <= low <= high, got {scale_exponents}")
        self.source = anomaly_source(source)
        self.anomaly_probability = float(anomaly_probability)
        self.beta = (float(beta[0]), float(beta[1]))
        self.blend = blend
        self.scale_exponents = (int(scale_exponents[0]), int(scale_exponents[1]))
        self.noise_rotation = float(noise_rotation)
        self.threshold = float(threshold)
        self.augmenters = int(augmenters)
        self.rotate_probability = float(rotate_probability)
        self.rotate_degrees = float(rotate_degrees)
        self.redraw_empty_masks = redraw_empty_masks
        self.structure_probability = float(structure_probability)
        self.structure_grid = int(structure_grid)
        self.structure_augmenters = int(structure_augmenters)
        self.min_region_fraction = float(min_region_fraction)
        super().__init__(seed)

    def rotate(self, images: torch.Tensor) -> torch.Tensor:
        """The training images' random rotation (before synthesis; the reconstruction target too)."""
        return rotate_images(images, self.generator, self.rotate_probability, self.rotate_degrees)

    def _mask(self, height: int, width: int, foreground: torch.Tensor | None = None) -> torch.Tensor:
        pruned = foreground is not None or self.min_region_fraction > 0
        attempts = 50 if pruned else 20 if self.redraw_empty_masks else 1
        for _ in range(attempts):
            mask = perlin_mask(height, width, self.generator, self.scale_exponents, self.noise_rotation, self.threshold)
            if pruned:
                mask = prune_regions(mask, math.ceil(self.min_region_fraction * height * width), foreground)
            if bool(mask.any()):
                break
        return mask

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, sources: torch.Tensor | None = None, foreground: torch.Tensor | None = None
    ) -> SyntheticAnomalies:
        if images.ndim != 4:
            raise ValueError(f"expected B x C x H x W images, got shape {tuple(images.shape)}")
        if sources is not None and sources.shape != images.shape:
            raise ValueError(f"sources {tuple(sources.shape)} must have the images' shape {tuple(images.shape)}")
        batch, _, height, width = images.shape
        if foreground is not None and foreground.shape != (batch, height, width):
            raise ValueError(f"foreground {tuple(foreground.shape)} must be B x H x W = {(batch, height, width)}")
        anomalous = torch.rand(batch, generator=self.generator) < self.anomaly_probability
        masks = torch.zeros(batch, height, width)
        for index in anomalous.nonzero().flatten().tolist():
            masks[index] = self._mask(height, width, None if foreground is None else foreground[index].float().cpu())
        count = int(anomalous.sum())
        if count == 0:
            return SyntheticAnomalies(images.clone(), masks.to(images.device), masks.flatten(1).any(dim=1).to(images.device))
        if sources is None:
            textures = augment_textures(self.source.draw(count, height, width, self.generator), self.generator, self.augmenters)
            if self.structure_probability > 0:
                structural = torch.rand(count, generator=self.generator) < self.structure_probability
                if bool(structural.any()):
                    own = images[anomalous.to(images.device)][structural.to(images.device)].detach().float().cpu()
                    own = augment_textures(own, self.generator, self.structure_augmenters)
                    textures[structural] = shuffle_tiles(own, self.structure_grid, self.generator)
        else:
            textures = sources[anomalous.to(sources.device)].detach().float().cpu()
        low, high = self.beta
        beta = low + (high - low) * torch.rand(count, generator=self.generator)
        image_weight = beta if self.blend == "code" else 1 - beta
        chosen = anomalous.to(images.device)
        output = images.clone()
        output[chosen] = blend_anomaly(
            images[chosen], textures.to(images), masks[anomalous].to(images.device), image_weight.to(images.device)
        )
        masks = masks.to(images.device)
        return SyntheticAnomalies(output, masks, masks.flatten(1).any(dim=1))


def color_jitter(image: torch.Tensor, generator: torch.Generator, strength: float = 0.1) -> torch.Tensor:
    """torchvision's ColorJitter(strength, strength, strength, strength) on one 3 x H x W image:
    brightness, contrast, saturation factors in [1 - s, 1 + s], hue shift in [-s, s], random order."""
    if strength <= 0:
        return image
    factors = 1 - strength + 2 * strength * torch.rand(3, generator=generator)
    hue = float(strength * (2 * torch.rand((), generator=generator) - 1))
    operations = [
        lambda x: TF.adjust_brightness(x, float(factors[0])),
        lambda x: TF.adjust_contrast(x, float(factors[1])),
        lambda x: TF.adjust_saturation(x, float(factors[2])),
        lambda x: TF.adjust_hue(x, hue),
    ]
    for index in torch.randperm(4, generator=generator).tolist():
        image = operations[index](image)
    return image.clamp(0, 1)


class CutPasteSynthesizer(SeededSynthesizer):
    """CutPaste's augmentations (Li et al., CVPR 2021), one of two kinds per synthesiser:

    - `kind="cutpaste"`: a rectangle of U(`area`) x the image area, aspect ratio log-uniform in
      `aspect`, cut at a random place, colour-jittered, pasted at another random place;
    - `kind="scar"`: a thin rectangle `scar_width` x `scar_height` pixels (the paper's 2-16 x
      10-25 at 256 px; not rescaled with the image), colour-jittered, rotated by
      U(-`scar_rotation`, `scar_rotation`) degrees, pasted at a random place.
    Every image receives one (has_anomaly is True unless a scar's rotated pixels all fell out).
    """

    def __init__(
        self,
        kind: Literal["cutpaste", "scar"] = "cutpaste",
        area: tuple[float, float] = (0.02, 0.15),
        aspect: tuple[float, float] = (0.3, 3.3),
        scar_width: tuple[int, int] = (2, 16),
        scar_height: tuple[int, int] = (10, 25),
        scar_rotation: float = 45.0,
        color_jitter: float = 0.1,
        seed: int = 0,
    ) -> None:
        if kind not in ("cutpaste", "scar"):
            raise ValueError(f"kind must be 'cutpaste' or 'scar', got {kind!r}")
        if not 0 < area[0] <= area[1] < 1:
            raise ValueError(f"area must be a range within (0, 1), got {area}")
        if not 0 < aspect[0] <= aspect[1]:
            raise ValueError(f"aspect must be a positive range, got {aspect}")
        self.kind = kind
        self.area = (float(area[0]), float(area[1]))
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
        self.scar_width = (int(scar_width[0]), int(scar_width[1]))
        self.scar_height = (int(scar_height[0]), int(scar_height[1]))
        self.scar_rotation = float(scar_rotation)
        self.color_jitter = float(color_jitter)
        super().__init__(seed)

    def _patch_size(self, height: int, width: int) -> tuple[int, int]:
        if self.kind == "scar":
            return min(height, self._integer(*self.scar_height)), min(width, self._integer(*self.scar_width))
        area = self._uniform(*self.area) * height * width
        aspect = math.exp(self._uniform(*self.log_aspect))  # width / height
        patch_h = min(height, max(1, round(math.sqrt(area / aspect))))
        patch_w = min(width, max(1, round(math.sqrt(area * aspect))))
        return patch_h, patch_w

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, sources: torch.Tensor | None = None) -> SyntheticAnomalies:
        if images.ndim != 4:
            raise ValueError(f"expected B x C x H x W images, got shape {tuple(images.shape)}")
        batch, _, height, width = images.shape
        output = images.clone()
        masks = torch.zeros(batch, height, width, device=images.device)
        for index in range(batch):
            patch_h, patch_w = self._patch_size(height, width)
            top, left = self._integer(0, height - patch_h), self._integer(0, width - patch_w)
            patch = color_jitter(images[index, :, top : top + patch_h, left : left + patch_w], self.generator, self.color_jitter)
            patch_mask = torch.ones(1, patch_h, patch_w, device=images.device)
            if self.kind == "scar" and self.scar_rotation:
                # Rotate within a square canvas holding the whole turned scar; the mask follows.
                side = min(max(height, width), math.ceil(math.hypot(patch_h, patch_w)))
                canvas = torch.zeros(1, 4, side, side, device=images.device)
                y0, x0 = (side - patch_h) // 2, (side - patch_w) // 2
                canvas[0, :3, y0 : y0 + patch_h, x0 : x0 + patch_w] = patch[:, : side - y0, : side - x0]
                canvas[0, 3, y0 : y0 + patch_h, x0 : x0 + patch_w] = 1
                angle = torch.tensor([self._uniform(-self.scar_rotation, self.scar_rotation)], device=images.device)
                turned = kornia.geometry.transform.rotate(canvas, angle, mode="nearest", padding_mode="zeros")[0]
                patch, patch_mask = turned[:3], turned[3:]
                patch_h, patch_w = min(side, height), min(side, width)
                patch, patch_mask = patch[:, :patch_h, :patch_w], patch_mask[:, :patch_h, :patch_w]
            y, x = self._integer(0, height - patch_h), self._integer(0, width - patch_w)
            region = output[index, :, y : y + patch_h, x : x + patch_w]
            region.copy_(patch_mask * patch + (1 - patch_mask) * region)
            masks[index, y : y + patch_h, x : x + patch_w] = torch.maximum(masks[index, y : y + patch_h, x : x + patch_w], patch_mask[0])
        return SyntheticAnomalies(output, masks, masks.flatten(1).any(dim=1))
