"""Synthetic anomalies for self-supervised training: defects pasted into normal images, exact masks.

Every synthesiser is a seeded callable `(images, sources) -> (anomalous images, masks)` on
B x 3 x H x W batches in [0, 1] (any device); masks are B x H x W in {0, 1} and mark exactly the
pixels that were blended. Methods draw their training anomalies from here, never from test data.
"""

from __future__ import annotations

import torch


class CutBlendSynthesizer:
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
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.generator).item()

    def _integer(self, low: int, high: int) -> int:
        """Uniform integer in [low, high] (both included)."""
        return int(torch.randint(low, high + 1, (), generator=self.generator))

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, sources: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
        return output, masks
