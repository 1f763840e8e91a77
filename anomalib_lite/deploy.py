"""The `anomalib-lite-export` command: a finished run's model as one self-contained artefact.

    anomalib-lite-export RUN_DIR --format onnx|openvino|torchscript --output DIR [--overwrite]

The artefact takes raw uint8 RGB images (B x 3 x H x W, any size) and does inside its graph all
the run did after reading the files: the resize and crop, the model, the anomaly map, the image
score and the post-processing fitted on held-out normal images (`engine.InferenceModel`). Outputs:
pred_score (B), anomaly_map (B x h x w), pred_label (B, bool: anomalous) and normalized_map (the
heatmaps' [0, 1] scale). DIR gets model.onnx (OpenVINO: model.xml + model.bin; TorchScript:
model.pt) and metadata.json (method, input, thresholds, colour scale, the run's config, versions).

ONNX goes through torch.export (`torch.onnx.export(dynamo=True)`, opset 18: its Resize carries the
antialiased bilinear filter the run resizes with); OpenVINO converts the torch module itself (its
reading of ONNX's antialiased Resize differs), at f32; TorchScript is traced. The run's folder is
only read. From Python: `anomalib_lite.export(run_dir, format, output)`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from anomalib_lite.commands import add_trust_package, parse_and_run
from anomalib_lite.engine.checkpoint import find_checkpoint, load_model, run_dir_of
from anomalib_lite.engine.inference import OUTPUT_NAMES, InferenceModel
from anomalib_lite.engine.module import AnomalyModule
from anomalib_lite.engine.trained import CHECKPOINT_DIR
from anomalib_lite.errors import UserInputError, one_line
from anomalib_lite.run_dir import OwnedFiles, check_writable

log = logging.getLogger(__name__)

FILES = {"onnx": ["model.onnx"], "openvino": ["model.xml", "model.bin"], "torchscript": ["model.pt"]}
FORMATS = tuple(FILES)
EXPORT_RECORD = ".anomalib_lite_export.json"  # in --output: the files this command wrote there
OPSET = 18  # Resize with antialias


def export(
    run_dir: str | Path, format: str, output: str | Path, overwrite: bool = False, trusted_packages: tuple[str, ...] = ()
) -> Path:
    """Export the run's model to `output` in `format` (onnx, openvino, torchscript); returns the
    model file's path. Refused in one line (`UserInputError`) for a method whose scoring is not a
    fixed computation, and for files in `output` this command did not write (or, without
    `overwrite`, an earlier export there)."""
    if format not in FORMATS:
        raise UserInputError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    checkpoint = find_checkpoint(run_dir)
    module = load_model(checkpoint, "cpu", trusted_packages)
    reason = type(module.model).not_exportable
    if reason is not None:
        raise UserInputError(f"{type(module).__name__} cannot be exported: {reason}")
    output = Path(output)
    owned = _prepare_output(output, run_dir_of(checkpoint), format, overwrite)
    owned.write([*FILES[format], "metadata.json"])
    inference, images = inference_model(module), example_images(module)
    with torch.no_grad():
        # Once before tracing: what a method computes on first use and keeps (CPR's gallery of
        # training descriptors) enters the graph as constants, not as a computation run per call.
        inference(images)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=output, prefix=".export-") as staging:
        staging = Path(staging)
        _WRITERS[format](inference, images, staging)
        (staging / "metadata.json").write_text(json.dumps(metadata(module, checkpoint, format), indent=2) + "\n")
        for name in [*FILES[format], "metadata.json"]:
            os.replace(staging / name, output / name)
    log.info("%s exported to %s in %.1f s", type(module).__name__, output / FILES[format][0], time.perf_counter() - start)
    return output / FILES[format][0]


def inference_model(module: AnomalyModule) -> InferenceModel:
    """The module's scoring from raw images to verdicts, in eval mode (what every format holds)."""
    if module.image_resize is None:
        raise UserInputError("the checkpoint does not say how the run resized its images: export needs a newer run")
    return InferenceModel(module.model, module.image_resize, module.post_processor).eval()


def example_images(module: AnomalyModule, batch: int = 2) -> torch.Tensor:
    """uint8 images at the run's resize size, for tracing (batch 2: no size-1 specialisation)."""
    height, width = module.image_resize.size
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _write_torchscript(model: InferenceModel, images: torch.Tensor, folder: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer's warnings about values taken as constants (kernel sizes and the like) and
        # TorchScript's deprecation: what the artefact computes is checked by the parity tests.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, images, check_trace=False, strict=False)
        torch.jit.save(traced, str(folder / "model.pt"))


def _write_onnx(model: InferenceModel, images: torch.Tensor, folder: Path) -> None:
    try:
        import onnxscript  # noqa: F401 - torch's exporter needs it
    except ImportError:
        raise UserInputError("ONNX export needs the export extra: pip install 'anomalib-lite[export]'") from None
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with torch.no_grad():
        try:
            # torch.export first, on its own: where the model fixes a size the graph would accept only
            # that size, and the ONNX exporter would fall back to it without a word.
            exported = torch.export.export(model, (images,), dynamic_shapes={"images": dims}, strict=False)
        except Exception as error:  # noqa: BLE001 - said in one line, the model named
            first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise UserInputError(
                f"{type(model.model).__name__} does not export to a graph for any image size: {one_line(first)}"
            ) from None
        program = torch.onnx.export(
            exported, dynamo=True, opset_version=OPSET, input_names=["images"], output_names=list(OUTPUT_NAMES),
            verbose=False, optimize=True,
        )
    program.save(str(folder / "model.onnx"), external_data=False)


def _write_openvino(model: InferenceModel, images: torch.Tensor, folder: Path) -> None:
    try:
        import openvino as ov
    except ImportError:
        raise UserInputError("OpenVINO export needs the export extra: pip install 'anomalib-lite[export]'") from None
    # From the torch module, not from the ONNX file: OpenVINO's reading of ONNX's antialiased Resize
    # scores resized images differently (PaDiM: 27 in a score range of 19), its own conversion does not.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # OpenVINO traces too: see _write_torchscript
        converted = ov.convert_model(
            softplus_without_beta(model), example_input=images, input=[ov.PartialShape([-1, 3, -1, -1])]
        )
    ov.save_model(converted, str(folder / "model.xml"), compress_to_fp16=False)


class _BetaFreeSoftplus(nn.Module):
    """`nn.Softplus(beta, threshold)` written as softplus(beta x) / beta: the same function."""

    def __init__(self, beta: float, threshold: float) -> None:
        super().__init__()
        self.beta, self.threshold = beta, threshold

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return F.softplus(values * self.beta, threshold=self.threshold) / self.beta


def softplus_without_beta(model: nn.Module) -> nn.Module:
    """`model` with its `nn.Softplus(beta != 1)` (FrEIA's global affine scale: beta 0.5) replaced, in
    place, by `_BetaFreeSoftplus`: OpenVINO 2026.4's PyTorch reader drops `beta` (its softplus(0)
    came out log 2, not 2 log 2), which moved the flows' scores by percents. In place, not on a
    copy: FrEIA calls the module through a closure over its block, which a copy would not rebind."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Softplus) and child.beta != 1:
                setattr(parent, name, _BetaFreeSoftplus(child.beta, child.threshold))
    return model


_WRITERS = {"onnx": _write_onnx, "openvino": _write_openvino, "torchscript": _write_torchscript}


def metadata(module: AnomalyModule, checkpoint: Path, format: str) -> dict[str, Any]:
    """What a user of the artefact needs besides it: input, outputs, thresholds, where it came from."""
    post_processor = module.post_processor
    floor, threshold, top = post_processor.colour_scale()
    config_path = run_dir_of(checkpoint) / "config.yaml"
    try:
        version_ = version("anomalib-lite")
    except PackageNotFoundError:
        version_ = None
    return {
        "format": format,
        "files": FILES[format],
        "method": type(module).__name__,
        "method_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "input": {
            "name": "images", "dtype": "uint8", "layout": "B x 3 x H x W, RGB, any H and W",
            "resize": module.image_resize.settings(), "map_size": list(module.image_resize.output_size),
        },
        "outputs": {
            "pred_score": "B float: higher is more anomalous",
            "anomaly_map": "B x h x w float, the method's units (higher is more anomalous)",
            "pred_label": "B bool: pred_score > image_threshold",
            "normalized_map": "B x h x w in [0, 1]: pixel_floor -> 0, pixel_threshold -> 0.5, colour_top -> 1",
        },
        "image_threshold": float(post_processor.image_threshold),
        "pixel_threshold": threshold,
        "pixel_floor": floor,
        "colour_top": top,
        "thresholds_fitted_on": "held-out normal images of the run (no test label)",
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint),
        "run_config": yaml.safe_load(config_path.read_text()) if config_path.is_file() else None,
        "anomalib_lite_version": version_,
        "torch_version": torch.__version__,
        "opset": OPSET if format in ("onnx", "openvino") else None,
    }


def file_sha256(path: Path) -> str:
    """The file's SHA-256: which checkpoint an artefact was exported from, even after the run moved."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prepare_output(output: Path, run_dir: Path, format: str, overwrite: bool) -> OwnedFiles:
    """The output folder, checked: not the run's own folder, no file of the user's replaced, an
    earlier export there replaced only with `overwrite`."""
    check_writable(output, "--output")
    run, target = run_dir.resolve(), output.resolve()
    if target == run or target == run / CHECKPOINT_DIR or run / CHECKPOINT_DIR in target.parents:
        raise UserInputError(f"--output {output} is the run's own folder: export writes beside a run, never into its files")
    owned = OwnedFiles(output, EXPORT_RECORD)
    earlier = set(owned.read() or [])
    for name in [*FILES[format], "metadata.json"]:
        target = output / name
        if (target.exists() or target.is_symlink()) and name not in earlier:
            raise UserInputError(f"{target} exists and was not written by anomalib-lite-export: choose another --output")
    if earlier and not overwrite:
        raise UserInputError(f"{output} already holds an export: pass --overwrite to replace it, or --output another folder")
    output.mkdir(parents=True, exist_ok=True)
    owned.remove_listed()
    return owned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anomalib-lite-export", description="Export a finished run's model, preprocessing and thresholds included."
    )
    parser.add_argument("run", help="a finished run's folder (or its checkpoints/model.ckpt)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", type=Path, required=True, help="the folder to write the artefact and metadata.json to")
    parser.add_argument("--overwrite", action="store_true", help="replace this command's earlier export in --output")
    add_trust_package(parser)
    return parse_and_run(parser, argv, _export_and_report)


def _export_and_report(args: argparse.Namespace) -> int:
    path = export(args.run, args.format, args.output, args.overwrite, tuple(args.trust_package))
    print(f"exported: {path}\n  metadata: {path.parent / 'metadata.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
