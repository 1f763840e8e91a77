"""Reading images and masks without losing their data, and the data check run before any fitting.

Images come back as float32 H x W x 3 in [0, 1], whatever they are stored as:
  - 8-bit files (PNG, JPEG, BMP, palette, grey, RGBA, CMYK) through Pillow, converted to RGB;
  - 16-bit and 32-bit integer images scaled by their type's range (16-bit grey PNG: / 65535),
    float images taken as they are when they lie in [0, 1], else scaled by their own min and max
    (there is no type range to go by; the data check says which files);
  - TIFF through tifffile (16-bit and float RGB, planar layouts, multi-page files: the first page);
    Pillow decodes 48-bit PNGs to 8 bits per channel (same scale, lower precision).
Masks: any value above `threshold` (default 0: any non-zero value) is defect, whatever the
mask's type (0/255, 0/1, soft grey levels, 16-bit); colour masks count a pixel as defect when any
channel is above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from anomalib_lite.errors import UserInputError

_TIFF_SUFFIXES = (".tif", ".tiff")
# Pillow modes read as they are (8 bits per channel); others go through numpy at full depth.
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa")


def _decode(path: Path) -> Image.Image | np.ndarray:
    """The first page/frame of `path`: a Pillow image (8-bit modes) or a numpy array (deeper data)."""
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            array = _read_tiff(path)
            if array is not None and array.dtype != np.uint8:
                return array
            if array is not None and (array.ndim == 2 or array.shape[-1] in (1, 3, 4)):
                # 8-bit TIFFs take the same path as every other 8-bit file.
                return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not in a loader worker
            if image.mode in _EIGHT_BIT_MODES:
                return image.copy()
            return np.asarray(image)
    except Image.DecompressionBombError as error:
        raise UserInputError(f"image {path} is too large to decode safely (Pillow's guard: {error}); downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise UserInputError(f"cannot read image {path}: {error}") from None


def _read_tiff(path: Path) -> np.ndarray | None:
    """A TIFF's first page at full depth (channels last); None when tifffile cannot decode it."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            array = page.asarray()
            planar = getattr(page, "planarconfig", None) == tifffile.PLANARCONFIG.SEPARATE
    except Exception:  # noqa: BLE001 - e.g. a compression tifffile lacks a codec for: Pillow may have one
        return None
    if planar and array.ndim == 3:
        array = np.moveaxis(array, 0, -1)
    return array


def _to_unit_range(array: np.ndarray, path: Path) -> tuple[np.ndarray, bool]:
    """(float32 values in [0, 1], whether the file's own min/max had to be used)."""
    if array.dtype == np.bool_:
        return array.astype(np.float32), False
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        low, high = (0, info.max) if info.min == 0 else (info.min, info.max)
        if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
            high = 65535  # Pillow's "I" mode: 16-bit data held in 32-bit integers
        return ((array.astype(np.float64) - low) / (high - low)).astype(np.float32), False
    if not np.issubdtype(array.dtype, np.floating):
        raise UserInputError(f"cannot read image {path}: unsupported pixel type {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise UserInputError(f"image {path} holds NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low >= 0 and high <= 1:
        return array, False
    return (array - low) / max(high - low, 1e-12), True


def _as_rgb(array: np.ndarray, path: Path) -> np.ndarray:
    """H x W (x C) -> H x W x 3: grey repeated, alpha dropped."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    if array.ndim == 3 and array.shape[-1] == 2:  # grey + alpha
        return np.repeat(array[..., :1], 3, axis=2)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return array[..., :3]
    raise UserInputError(
        f"cannot read image {path}: shape {tuple(array.shape)} is not grey, RGB or RGBA (multi-channel images are not supported)"
    )


@dataclass
class ImageInfo:
    """What the data check learned from decoding one file."""

    size: tuple[int, int]  # (width, height)
    rescaled: bool = False  # float image outside [0, 1]: scaled by its own min/max
    mask_values: tuple[float, ...] = ()  # up to a few distinct values (masks only)
    mask_empty: bool = False


def read_image(path: Path) -> Image.Image | np.ndarray:
    """An 8-bit RGB Pillow image, or float32 H x W x 3 in [0, 1] for deeper data (see module docstring).

    Both become the same floats in `ImageResize.to_tensor` (8-bit v and 16-bit 257 v alike).
    """
    decoded = _decode(path)
    if isinstance(decoded, Image.Image):
        return decoded.convert("RGB")
    return _as_rgb(_to_unit_range(decoded, path)[0], path)


def _mask_values(decoded: Image.Image | np.ndarray) -> np.ndarray:
    """A decoded mask as H x W values (palette/bilevel via grey; colour: the largest channel, alpha ignored)."""
    array = np.asarray(decoded.convert("L") if isinstance(decoded, Image.Image) and decoded.mode in ("P", "1") else decoded)
    return array[..., : min(array.shape[-1], 3)].max(axis=-1) if array.ndim == 3 else array


def read_mask(path: Path, threshold: float = 0) -> np.ndarray:
    """H x W uint8, 1 where the mask's value is above `threshold` (any channel), else 0."""
    return (_mask_values(_decode(path)) > threshold).astype(np.uint8)


def inspect_image(path: Path) -> ImageInfo:
    decoded = _decode(path)
    if isinstance(decoded, Image.Image):
        return ImageInfo(decoded.size)
    _, rescaled = _to_unit_range(decoded, path)
    _as_rgb(decoded, path)
    return ImageInfo((decoded.shape[1], decoded.shape[0]), rescaled=rescaled)


def inspect_mask(path: Path, threshold: float) -> ImageInfo:
    values = _mask_values(_decode(path))
    distinct = np.unique(values)
    return ImageInfo(
        (values.shape[1], values.shape[0]), mask_values=tuple(float(v) for v in distinct[:8]),
        mask_empty=not bool((values > threshold).any()),
    )


@dataclass
class DataReport:
    """The data check's findings over every image and mask of a data module."""

    num_images: int = 0
    smallest: tuple[int, int] | None = None  # (width, height) of the smallest image
    rescaled: list[Path] = field(default_factory=list)
    mask_values: set[float] = field(default_factory=set)
    empty_masks: list[Path] = field(default_factory=list)  # defect images whose mask has no defect pixel
    num_masks: int = 0


def check_files(samples: Sequence, mask_threshold: float = 0, workers: int = 4) -> DataReport:
    """Decode every image and mask once (threads: decoding releases the GIL).

    Unreadable files and masks of another size than their image are user errors (one line);
    the rest is reported for the data module to log.
    """

    def check(sample) -> tuple[ImageInfo, ImageInfo | None]:  # noqa: ANN001
        image = inspect_image(sample.image_path)
        if sample.mask_path is None:
            return image, None
        if not sample.mask_path.is_file():
            raise UserInputError(f"no mask for test image {sample.image_path} (expected {sample.mask_path})")
        mask = inspect_mask(sample.mask_path, mask_threshold)
        if mask.size != image.size:
            raise UserInputError(
                f"mask {sample.mask_path} is {mask.size[0]}x{mask.size[1]} but its image "
                f"{sample.image_path} is {image.size[0]}x{image.size[1]}"
            )
        return image, mask

    report = DataReport(num_images=len(samples))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(check, samples))
    for sample, (image, mask) in zip(samples, results):
        if report.smallest is None or image.size[0] * image.size[1] < report.smallest[0] * report.smallest[1]:
            report.smallest = image.size
        if image.rescaled:
            report.rescaled.append(sample.image_path)
        if mask is not None:
            report.num_masks += 1
            report.mask_values.update(mask.mask_values)
            if mask.mask_empty and sample.label == 1:
                report.empty_masks.append(sample.mask_path)
    return report
