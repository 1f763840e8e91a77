"""Where synthetic anomalies take their appearance from: texture images, and how they are varied.

DRAEM-style synthesis (`anomaly_synthesis.PerlinSynthesizer`) fills a Perlin-shaped region with a
texture that has nothing to do with the object. An `AnomalySource` draws such textures, seeded by
the caller's generator:
- `TextureFolder`: random images from any folder of pictures (the DRAEM authors use DTD; here
  `../shared/datasets/dtd_subset`), resized to the image size.
- `ProceduralTextures`: textures generated in the package (fractal noise, warped stripes and
  checkers, coloured by random palettes), so tests and the default run need no download.
`augment_textures` then applies 3 distinct augmenters of the authors' 10 (imgaug in their code,
kornia's ops here) to every texture.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import kornia
import torch
import torch.nn.functional as F

from anomalib_lite.data.image_io import read_image
from anomalib_lite.data.perlin import fractal_noise
from anomalib_lite.data.samples import ImageResize, is_image_file
from anomalib_lite.errors import UserInputError


def _uniform(generator: torch.Generator, low: float, high: float, size: tuple[int, ...] = ()) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


def _integer(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


class AnomalySource(ABC):
    """Draws texture images: `draw(count, height, width, generator)` -> count x 3 x H x W in [0, 1]."""

    @abstractmethod
    def draw(self, count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor: ...

    @abstractmethod
    def describe(self) -> str:
        """One line for the run's log: which source the anomalies come from."""


class TextureFolder(AnomalySource):
    """Random images of a folder (searched recursively), resized to the requested size.

    Decoded, resized textures are kept in memory as 8-bit (up to `cache_bytes`): DRAEM draws one
    per training image per epoch from ~1,000 files, and decoding dominates otherwise.
    """

    def __init__(self, root: str | Path, cache_bytes: int = 1 << 30) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise UserInputError(f"anomaly source folder {self.root} does not exist (set it to a folder of texture images, or null for procedural textures)")
        self.paths = sorted(p for p in self.root.rglob("*") if p.is_file() and is_image_file(p))
        if not self.paths:
            raise UserInputError(f"anomaly source folder {self.root} holds no images (.png, .jpg, ...)")
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, height: int, width: int) -> torch.Tensor:
        """Texture `index` as 3 x H x W float in [0, 1]."""
        key = (index, height, width)
        if key in self._cache:
            return self._cache[key].float() / 255
        image = ImageResize((height, width)).to_tensor(read_image(self.paths[index]))
        quantised = (image * 255).round().to(torch.uint8)
        if self._cached_bytes + quantised.numel() <= self.cache_bytes:
            self._cache[key] = quantised
            self._cached_bytes += quantised.numel()
        return quantised.float() / 255  # the same values whether cached or not

    def draw(self, count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        indices = torch.randint(len(self.paths), (count,), generator=generator).tolist()
        return torch.stack([self.load(i, height, width) for i in indices])

    def describe(self) -> str:
        return f"{len(self.paths)} texture images from {self.root}"


class ProceduralTextures(AnomalySource):
    """Textures generated on the fly: no files needed.

    Each texture is one of three patterns, each warped by fractal noise so that no two repeat:
    fractal (cloud-like) noise, stripes at a random angle and frequency, or a checker/cell pattern;
    its values are mapped through a random palette of two or three colours and given fine
    per-channel grain. They are varied by the same augmenters as folder textures. They are not
    photographs: DRAEM's paper uses DTD, and `TextureFolder` on `dtd_subset` is how its numbers
    are reproduced; the procedural source exists so a run works without any download.
    """

    PATTERNS = ("fractal noise", "stripes", "checker")

    def draw(self, count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        return torch.stack([self._texture(height, width, generator) for _ in range(count)])

    def _texture(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        pattern = self.PATTERNS[_integer(generator, 0, len(self.PATTERNS) - 1)]
        warp = fractal_noise(height, width, generator, base_resolution=_integer(generator, 1, 4))
        if pattern == "fractal noise":
            values = fractal_noise(height, width, generator, base_resolution=2 ** _integer(generator, 0, 3), octaves=5)
            values = (values - values.min()) / (values.max() - values.min()).clamp_min(1e-6)
        else:
            y = torch.linspace(0, 1, height).view(-1, 1)
            x = torch.linspace(0, 1, width).view(1, -1)
            angle = float(_uniform(generator, 0, math.pi))
            frequency = float(_uniform(generator, 3, 30))
            strength = float(_uniform(generator, 0, 2))
            u = (x * math.cos(angle) + y * math.sin(angle)) * frequency + strength * warp
            if pattern == "stripes":
                values = 0.5 + 0.5 * torch.sin(2 * math.pi * u)
            else:
                v = (-x * math.sin(angle) + y * math.cos(angle)) * frequency + strength * warp
                values = ((torch.sin(math.pi * u) * torch.sin(math.pi * v)) > 0).float()
                values = F.avg_pool2d(values[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
        palette = torch.rand(_integer(generator, 2, 3), 3, generator=generator)
        position = values * (len(palette) - 1)
        low = position.floor().long().clamp(max=len(palette) - 2)
        fraction = (position - low).unsqueeze(0)
        image = palette[low].permute(2, 0, 1) * (1 - fraction) + palette[low + 1].permute(2, 0, 1) * fraction
        grain = float(_uniform(generator, 0, 0.15)) * torch.randn(3, height, width, generator=generator)
        return (image + grain).clamp(0, 1)

    def describe(self) -> str:
        return "procedural textures (fractal noise, stripes, checkers; no texture folder given)"


def anomaly_source(source: str | Path | AnomalySource | None) -> AnomalySource:
    """A folder path -> `TextureFolder`; None -> `ProceduralTextures`; a source stays as it is."""
    if isinstance(source, AnomalySource):
        return source
    return ProceduralTextures() if source is None else TextureFolder(source)


# -- the authors' ten augmenters (imgaug in their code), on one 1 x 3 x H x W image in [0, 1] ------
def _gamma_contrast(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    gamma = _uniform(generator, 0.5, 2.0, (3,)).to(image)  # per channel
    return kornia.enhance.adjust_gamma(image.transpose(0, 1), gamma).transpose(0, 1)


def _brightness(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # imgaug's MultiplyAndAddToBrightness: multiply then add on the luma channel (YCbCr).
    multiply, add = float(_uniform(generator, 0.8, 1.2)), float(_uniform(generator, -30, 30)) / 255
    ycbcr = kornia.color.rgb_to_ycbcr(image)
    ycbcr = torch.cat([(ycbcr[:, :1] * multiply + add).clamp(0, 1), ycbcr[:, 1:]], dim=1)
    return kornia.color.ycbcr_to_rgb(ycbcr)


def _sharpen(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return kornia.enhance.sharpness(image, float(_uniform(generator, 0.0, 2.0)))  # PIL's EnhanceSharpness range


def _hue_saturation(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # imgaug's AddToHueAndSaturation((-50, 50), per_channel=True): independent additions on its
    # 0-255 scale; 255 is a full turn of hue (360 degrees) and full saturation.
    hue, saturation = (_uniform(generator, -50, 50, (2,)) / 255).tolist()
    hsv = kornia.color.rgb_to_hsv(image)
    h = torch.remainder(hsv[:, :1] + hue * 2 * math.pi, 2 * math.pi)
    s = (hsv[:, 1:2] + saturation).clamp(0, 1)
    return kornia.color.hsv_to_rgb(torch.cat([h, s, hsv[:, 2:]], dim=1))


def _solarize(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # imgaug's Solarize(0.5, threshold=(32, 128)): applied to half of the images.
    threshold = float(_uniform(generator, 32, 128)) / 255
    return kornia.enhance.solarize(image, threshold) if float(torch.rand((), generator=generator)) < 0.5 else image


def _posterize(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return kornia.enhance.posterize(image, _integer(generator, 1, 8))  # imgaug's default nb_bits=(1, 8)


def _invert(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return kornia.enhance.invert(image)


def _autocontrast(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # PIL's autocontrast with imgaug's default cutoff (0-20 % of each histogram end), per channel.
    cutoff = float(_uniform(generator, 0, 20)) / 100
    flat = image.flatten(2)
    low = torch.quantile(flat, cutoff, dim=2, keepdim=True).unsqueeze(-1)
    high = torch.quantile(flat, 1 - cutoff, dim=2, keepdim=True).unsqueeze(-1)
    stretched = (image - low) / (high - low).clamp_min(1 / 255)
    return torch.where(high - low > 1 / 255, stretched, image).clamp(0, 1)


def _equalize(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return kornia.enhance.equalize(image)


def _rotate(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    angle = _uniform(generator, -45, 45, (1,)).to(image)
    return kornia.geometry.transform.rotate(image, angle, padding_mode="zeros")  # imgaug's constant 0 fill


AUGMENTERS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "gamma_contrast": _gamma_contrast, "brightness": _brightness, "sharpen": _sharpen,
    "hue_saturation": _hue_saturation, "solarize": _solarize, "posterize": _posterize, "invert": _invert,
    "autocontrast": _autocontrast, "equalize": _equalize, "rotate": _rotate,
}


def augment_textures(textures: torch.Tensor, generator: torch.Generator, count: int = 3) -> torch.Tensor:
    """Each texture through `count` distinct augmenters of `AUGMENTERS`, in a random order (the
    authors' `randAugmenter`: three drawn without replacement, applied in the order drawn)."""
    if not 0 <= count <= len(AUGMENTERS):
        raise ValueError(f"count must be in [0, {len(AUGMENTERS)}], got {count}")
    functions = list(AUGMENTERS.values())
    augmented = []
    for texture in textures:
        image = texture.unsqueeze(0).float()
        for index in torch.randperm(len(functions), generator=generator)[:count].tolist():
            image = functions[index](image, generator).clamp(0, 1)
        augmented.append(image[0])
    return torch.stack(augmented) if augmented else textures
