"""An exported model (`anomalib-lite-export`'s folder) scoring images with its own runtime: ONNX
Runtime, OpenVINO or TorchScript. Neither Lightning nor the method's code is imported: the
artefact holds the resize, the model and the thresholds; `metadata.json` says the rest."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalib_lite.data.image_io import read_image
from anomalib_lite.errors import UserInputError

METADATA = "metadata.json"
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}  # the CPU plugin's default may be bfloat16


def is_export(path: str | Path) -> bool:
    """Whether `path` is an export folder (its metadata.json names a format)."""
    return (Path(path) / METADATA).is_file()


class ExportedModel:
    """`model(images)`: uint8 B x 3 x H x W (numpy) -> dict of the artefact's outputs (numpy):
    pred_score, anomaly_map, pred_label, normalized_map."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            self.metadata: dict[str, Any] = json.loads((self.folder / METADATA).read_text())
            self.format = self.metadata["format"]
        except (OSError, ValueError, KeyError) as error:
            raise UserInputError(f"{self.folder / METADATA} is not an anomalib-lite export's metadata: {error}") from None
        self._run = self._load()

    def _load(self) -> Any:  # noqa: ANN401 - the runtime's own callable
        path = self.folder / self.metadata["files"][0]
        if not path.is_file():
            raise UserInputError(f"{path} is missing: the export folder is incomplete")
        if self.format == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return lambda images: session.run(None, {"images": images})
        if self.format == "openvino":
            import openvino

            compiled = openvino.Core().compile_model(str(path), "CPU", OPENVINO_CONFIG)
            return lambda images: [results[output] for results in [compiled(images)] for output in compiled.outputs]
        if self.format == "torchscript":
            import torch

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation: the format asked for
                module = torch.jit.load(str(path), map_location="cpu")

            def run(images: np.ndarray) -> list[np.ndarray]:
                with torch.no_grad():
                    return [output.numpy() for output in module(torch.from_numpy(images))]

            return run
        raise UserInputError(f"{self.folder / METADATA} names an unknown format {self.format!r}")

    @property
    def image_threshold(self) -> float:
        return float(self.metadata["image_threshold"])

    @property
    def colour_scale(self) -> tuple[float, float, float]:
        return float(self.metadata["pixel_floor"]), float(self.metadata["pixel_threshold"]), float(self.metadata["colour_top"])

    @property
    def resize(self) -> dict[str, Any]:
        return self.metadata["input"]["resize"]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self._run(np.ascontiguousarray(images, dtype=np.uint8))
        return dict(zip(("pred_score", "anomaly_map", "pred_label", "normalized_map"), outputs))


def as_uint8(path: Path) -> np.ndarray:
    """3 x H x W uint8 RGB, read as the run reads files (`image_io`); deeper data rounded to 8 bits."""
    image = read_image(path)
    array = np.asarray(image, dtype=np.uint8) if isinstance(image, Image.Image) else np.rint(np.asarray(image) * 255).astype(np.uint8)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def same_size_batches(files: Sequence[Path], batch_size: int) -> Iterator[tuple[list[Path], np.ndarray]]:
    """Consecutive files of the same size, up to `batch_size` at a time, as uint8 B x 3 x H x W."""
    paths: list[Path] = []
    images: list[np.ndarray] = []
    for path in files:
        image = as_uint8(path)
        if images and (image.shape != images[0].shape or len(images) == batch_size):
            yield paths, np.stack(images)
            paths, images = [], []
        paths.append(path)
        images.append(image)
    if images:
        yield paths, np.stack(images)
