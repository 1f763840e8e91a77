"""The validation set: held-out normal images, and the same images with synthetic anomalies.

Nothing in it comes from the test set. The normal images fit the thresholds and the heatmap colour
scale (and give trained methods their validation loss); the synthetic view - each normal image
with patches of another held-out image blended in, seeded per image, with exact masks - gives
label-free metrics (`val_synthetic_image_auroc`, `val_synthetic_aupro`) to select epochs and
hyperparameters with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hydra.utils import get_class, instantiate
from torch.utils.data import Dataset

from anomalib_lite.data.anomaly_synthesis import CutBlendSynthesizer, PerlinSynthesizer, SeededSynthesizer
from anomalib_lite.data.batch import Item
from anomalib_lite.data.protocols import RandomRotationCrop
from anomalib_lite.data.samples import AnomalyDataset, ImageResize, Sample

SYNTHETIC_DEFECT_TYPE = "synthetic"


class ValidationSet(Dataset):
    """Items 2i: held-out normal image i; items 2i + 1: image i with a synthetic anomaly.

    Interleaved, so every validation batch holds both kinds. `synthesis` are the synthesiser's
    arguments: by default a `CutBlendSynthesizer`'s (the anomaly of image i is cut from held-out
    image i + 1, from itself when there is only one); with a `_target_` any synthesiser of
    `anomaly_synthesis` (e.g. `PerlinSynthesizer`, DRAEM's textures in Perlin-shaped regions,
    always with an anomaly: `anomaly_probability` 1, empty masks redrawn). It is reseeded with
    (seed, i): the same synthetic set in every epoch, run and DDP layout. Decoded images are
    kept in memory (up to `cache_bytes`), since validation repeats after every training epoch.
    `synthesis=None` leaves only the normal images.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        resize: ImageResize,
        synthesis: dict | None = None,
        seed: int = 0,
        cache_bytes: int = 1 << 30,
        geometry: RandomRotationCrop | None = None,
    ) -> None:
        self.images = AnomalyDataset(samples, resize, geometry=geometry)
        self.synthesizer = validation_synthesizer(synthesis)
        self.seed = seed
        self.cache_bytes = cache_bytes
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0

    @property
    def with_synthetic(self) -> bool:
        return self.synthesizer is not None

    def __len__(self) -> int:
        return len(self.images) * (2 if self.with_synthetic else 1)

    def _image(self, index: int) -> torch.Tensor:
        if index in self._cache:
            return self._cache[index]
        image = self.images.load_image(index)
        size = image.numel() * image.element_size()
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[index] = image
            self._cached_bytes += size
        return image

    def __getitem__(self, index: int) -> Item:
        normal_index, synthetic = divmod(index, 2) if self.with_synthetic else (index, 0)
        sample = self.images.samples[normal_index]
        image = self._image(normal_index)
        if not synthetic:
            return Item(image, torch.zeros(image.shape[1:]), 0, index, "good", str(sample.image_path), True)
        source = self._image((normal_index + 1) % len(self.images)).unsqueeze(0)
        self.synthesizer.reseed(self.seed * 1_000_003 + normal_index)
        anomalous, mask, _ = self.synthesizer(image.unsqueeze(0), source if self.synthesizer.takes_image_sources else None)
        return Item(
            anomalous[0], mask[0], 1, index, SYNTHETIC_DEFECT_TYPE, f"{sample.image_path}#synthetic", True
        )


def validation_synthesizer(synthesis: dict | None) -> SeededSynthesizer | None:
    """The validation view's synthesiser from the dataset's `val_synthesis` (see `ValidationSet`)."""
    if synthesis is None:
        return None
    if "_target_" not in synthesis:
        return CutBlendSynthesizer(**synthesis)
    settings = dict(synthesis)
    target = settings.pop("_target_")
    if issubclass(get_class(target), PerlinSynthesizer):
        # Every synthetic validation image is labelled anomalous: it must hold an anomaly.
        settings = {**settings, "anomaly_probability": 1.0, "redraw_empty_masks": True, "rotate_probability": 0.0}
    return instantiate({"_target_": target, **settings})
