"""The `anomalib-lite-predict` command: score a folder of images with a finished run's model.

    anomalib-lite-predict outputs/runs/<run> path/to/images [--output DIR] [--max-heatmaps N]

The run's checkpoint carries all it needs: the method, its weights, the thresholds fitted on
held-out normal images and the run's resize and crop. Images of any size, bit depth or format are
read as in training (`data.image_io`), so a run's test images score exactly as in its
predictions.csv. Writes DIR/predictions.csv (image, folder, score, verdict) and DIR/heatmaps/
(input | anomaly map, verdict in the header); DIR defaults to <run>/predict/<images folder name>.

Given an export folder (`anomalib-lite-export`) instead of a run, the artefact scores the images with
its own runtime (ONNX Runtime, OpenVINO, TorchScript); neither Lightning nor the method's code is
imported. Files are read as the run reads them and given to it as 8-bit RGB.

From Python: `load_model(run_dir_or_checkpoint)` returns the method in eval mode; calling it on a
B x 3 x H x W tensor (uint8, or float in [0, 1], any size) preprocesses as the run did.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from anomalib_lite.commands import add_trust_package, parse_and_run
from anomalib_lite.data.batch import Batch, collate_items
from anomalib_lite.data.samples import (
    IMAGE_EXTENSIONS,
    AnomalyDataset,
    ImageResize,
    Sample,
    check_file_name,
    is_image_file,
)
from anomalib_lite.errors import UserInputError
from anomalib_lite.run_dir import OwnedFiles, check_writable
from anomalib_lite.serve import ExportedModel, is_export, same_size_batches
from anomalib_lite.visualization import heatmap_name, render_heatmap, save_atomically

if TYPE_CHECKING:
    from anomalib_lite.engine import AnomalyModule

log = logging.getLogger(__name__)

MAX_PENDING = 64  # heatmaps handed to the writer thread and not yet written: bounds the images held


def list_image_files(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(image file, its folder relative to the given folder) for every image under `paths`
    (folders are searched recursively, hidden files and `*_mask` files skipped)."""
    found: list[tuple[Path, str]] = []
    for given in map(Path, paths):
        if given.is_file():
            found.append((check_file_name(given), ""))
        elif given.is_dir():
            for file in sorted(given.rglob("*")):
                relative = file.relative_to(given)
                if file.is_file() and is_image_file(file) and not any(part.startswith(".") for part in relative.parts):
                    check_file_name(file)
                    found.append((file, relative.parent.as_posix() if relative.parent != Path(".") else ""))
        else:
            raise UserInputError(f"no such image folder or file: {given}")
    if not found:
        raise UserInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {', '.join(map(str, paths))}")
    return found


def load_model(checkpoint: str | Path, *args: Any, **kwargs: Any) -> AnomalyModule:
    """`anomalib_lite.engine.checkpoint.load_model` (imported on call: an export's predict needs no
    Lightning)."""
    from anomalib_lite.engine.checkpoint import load_model as load

    return load(checkpoint, *args, **kwargs)


# One batch of scored images: (paths, the images as the model saw them (B x 3 x h x w float, for the
# sheets), image scores (B), verdicts (B), maps on the heatmaps' [0, 1] scale (B x h x w)).
Scored = tuple[list[Path], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class _RunScorer:
    """A run's checkpoint, in this process (Lightning and the method's code)."""

    def __init__(self, run: str, device: str, trusted_packages: Sequence[str]) -> None:
        from anomalib_lite.engine.checkpoint import find_checkpoint, run_dir_of

        self.source = find_checkpoint(run)
        self.home = run_dir_of(self.source)
        self.model = load_model(self.source, map_location=device, trusted_packages=trusted_packages)
        post_processor = self.model.post_processor
        self.threshold = float(post_processor.image_threshold)
        self.scale = post_processor.colour_scale()
        self.resize = self.model.image_resize.settings()

    def batches(self, files: Sequence[Path], batch_size: int, workers: int) -> Iterator[Scored]:
        post_processor = self.model.post_processor
        for batch, scores, maps in predict_batches(self.model, files, batch_size, workers):
            normalized = post_processor.normalize_anomaly_map(maps.to(self.model.device)).cpu()
            yield [Path(p) for p in batch.image_path], batch.image, scores, scores > self.threshold, normalized


class _ExportScorer:
    """An export folder, with its own runtime: what its graph computes, verdicts included."""

    def __init__(self, folder: str) -> None:
        self.source = Path(folder)
        self.home = self.source
        self.model = ExportedModel(folder)
        self.threshold = self.model.image_threshold
        self.scale = self.model.colour_scale
        self.resize = self.model.resize

    def batches(self, files: Sequence[Path], batch_size: int, workers: int) -> Iterator[Scored]:
        resize = ImageResize(**self.resize)
        for paths, images in same_size_batches(files, batch_size):
            outputs = self.model(images)
            shown = resize.resize_batch(torch.from_numpy(images).float() / 255).clamp(0, 1)
            yield (
                paths, shown, torch.from_numpy(outputs["pred_score"]).float(), torch.from_numpy(outputs["pred_label"]).bool(),
                torch.from_numpy(outputs["normalized_map"]).float(),
            )


def predict_batches(
    model: AnomalyModule, files: Sequence[Path], batch_size: int = 32, num_workers: int = 0
) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor]]:
    """(batch, scores, anomaly maps) for `files`, read and resized exactly as the run read its test images."""
    if model.image_resize is None:
        raise UserInputError("the model has no stored preprocessing (image_resize): load it with load_model()")
    dataset = AnomalyDataset([Sample(Path(f), 0, "") for f in files], model.image_resize)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_items)
    with torch.inference_mode():
        for batch in loader:
            output = model.model(batch.image.to(model.device))
            yield batch, output.pred_score.float().cpu(), output.anomaly_map.float().cpu()


PREDICT_RECORD = ".anomalib_lite_predict.json"  # in --output: the files this command wrote there


def _prepare_output(output: Path, overwrite: bool, heatmap_targets: Sequence[Path]) -> OwnedFiles:
    """The output folder's own files, checked: earlier predictions only with `overwrite`, and never
    a file of the user's (at a path this call would write)."""
    check_writable(output, "--output")
    owned = OwnedFiles(output, PREDICT_RECORD)
    earlier = set(owned.read() or [])
    for target in [output / "predictions.csv", *heatmap_targets]:
        name = target.relative_to(output).as_posix()
        if (target.exists() or target.is_symlink()) and name not in earlier:
            raise UserInputError(f"{target} exists and was not written by anomalib-lite-predict: choose another --output")
    if earlier and not overwrite:
        raise UserInputError(f"{output} already holds predictions.csv: pass --overwrite to replace it, or --output another folder")
    output.mkdir(parents=True, exist_ok=True)
    owned.remove_listed()  # this command's earlier files, and only those
    return owned


def unique_heatmap_paths(files: Sequence[tuple[Path, str]]) -> list[Path]:
    """A heatmap path per input, relative to the heatmaps folder, distinct for every input: inputs
    from several given folders can share a relative path, and a name can differ only by case."""
    taken: set[str] = set()
    paths = []
    for image, folder in files:
        path = Path(folder) / heatmap_name(image.name)
        candidate, count = path, 1
        while candidate.as_posix().lower() in taken:  # lower(): a case-insensitive file system, too
            count += 1
            candidate = path.with_name(f"{path.stem}_{count}{path.suffix}")
        taken.add(candidate.as_posix().lower())
        paths.append(candidate)
    return paths


def resolve_device(requested: str) -> str:
    """`auto` -> cuda when there is one, else cpu; an explicit device must exist here."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise UserInputError(f"--device {requested}: not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"--device {requested}: this machine has no CUDA device; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserInputError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"--device {requested}: only cpu and cuda devices are supported")
    return str(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anomalib-lite-predict", description="Score images with a finished run's model: predictions.csv and heatmaps."
    )
    parser.add_argument("run", help="a finished run's folder (or its checkpoints/model.ckpt), or an export folder")
    parser.add_argument("images", nargs="+", help="image folders (searched recursively) or files")
    parser.add_argument("--output", type=Path, help="where to write (default: <run>/predict/<first folder's name>)")
    parser.add_argument("--max-heatmaps", type=int, default=None, help="heatmaps to write (default: all; 0: none)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image reading processes")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace this command's earlier predictions in --output")
    add_trust_package(parser)
    return parse_and_run(parser, argv, _predict, ": predictions.csv was not written")


def _predict(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_heatmaps is not None and args.max_heatmaps < 0:
        raise UserInputError(f"--max-heatmaps must be 0 or more, got {args.max_heatmaps}")
    scorer: _RunScorer | _ExportScorer
    if is_export(args.run):
        scorer = _ExportScorer(args.run)
    else:
        scorer = _RunScorer(args.run, resolve_device(args.device), args.trust_package)
    output = args.output or scorer.home / "predict" / (Path(args.images[0]).resolve().name or "images")
    # Outputs are never inputs: this command's earlier files in --output (it may be the images folder) are left out.
    earlier = {(output / name).resolve() for name in OwnedFiles(output, PREDICT_RECORD).read() or []}
    files = [(f, folder) for f, folder in list_image_files(args.images) if f.resolve() not in earlier]
    if not files:
        raise UserInputError(f"no images under {', '.join(args.images)} but this command's own earlier outputs")
    max_heatmaps = len(files) if args.max_heatmaps is None else args.max_heatmaps
    heatmap_paths = [output / "heatmaps" / p for p in unique_heatmap_paths(files)[:max_heatmaps]]
    owned = _prepare_output(output, args.overwrite, heatmap_paths)
    # Listed before anything is written: a call that fails half-way still owns what it wrote.
    owned.write(["predictions.csv", *(p.relative_to(output).as_posix() for p in heatmap_paths)])
    threshold, scale = scorer.threshold, scorer.scale
    log.info("%s: %d images, resized as the run (%s), image threshold %.4g", scorer.source, len(files), scorer.resize, threshold)
    folders = dict(files)
    rows, pending = [], deque()
    start = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="heatmaps") as pool, tqdm(
        total=len(files), unit="img", disable=None, desc="predict"
    ) as bar:
        for paths, images, scores, verdicts, normalized in scorer.batches([f for f, _ in files], args.batch_size, args.workers):
            for i, path in enumerate(paths):
                folder, score = folders[path], float(scores[i])
                anomalous = bool(verdicts[i])
                rows.append((str(path), folder, f"{score:.9g}", int(anomalous)))
                if len(rows) <= max_heatmaps:
                    title = f"{folder}/{path.name}" if folder else path.name
                    text = f"image score {score:.3g}, image threshold {threshold:.3g}: {'ANOMALOUS' if anomalous else 'normal'}"
                    target = heatmap_paths[len(rows) - 1]
                    while len(pending) >= MAX_PENDING:
                        pending.popleft().result()  # re-raises a worker's error
                    pending.append(pool.submit(_save_heatmap, images[i], normalized[i], title, text, scale, anomalous, target))
            bar.update(len(paths))
        for job in pending:
            job.result()
    seconds = time.perf_counter() - start
    temporary = output / ".predictions.csv.tmp"
    with temporary.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "folder", "score", "predicted_anomalous"])
        writer.writerows(rows)
    os.replace(temporary, output / "predictions.csv")
    anomalous = sum(row[3] for row in rows)
    print(
        f"{len(rows)} images scored in {seconds:.1f} s: {anomalous} anomalous, {len(rows) - anomalous} normal "
        f"(image threshold {threshold:.4g})\n  predictions: {output / 'predictions.csv'}"
        + (f"\n  heatmaps:    {output / 'heatmaps'}" if max_heatmaps else ""),
        flush=True,
    )
    return 0


def _save_heatmap(
    image: torch.Tensor, normalized: torch.Tensor, title: str, text: str, scale: tuple[float, float, float], anomalous: bool,
    target: Path,
) -> None:
    sheet = render_heatmap(image, None, normalized, title, text, scale=scale, anomalous=anomalous)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(sheet, target)


if __name__ == "__main__":
    sys.exit(main())
