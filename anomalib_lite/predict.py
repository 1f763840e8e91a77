"""The `anomalib-lite-predict` command: score a folder of images with a finished run's model.

    anomalib-lite-predict outputs/runs/<run> path/to/images [--output DIR] [--max-heatmaps N]

The run's checkpoint carries all it needs: the method, its weights, the thresholds fitted on
held-out normal images and the run's resize and crop. Images of any size, bit depth or format are
read as in training (`data.image_io`), so a run's test images score exactly as in its
predictions.csv. Writes DIR/predictions.csv (image, folder, score, verdict) and DIR/heatmaps/
(input | anomaly map, verdict in the header); DIR defaults to <run>/predict/<images folder name>.

From Python: `load_model(run_dir_or_checkpoint)` returns the method in eval mode; calling it on a
B x 3 x H x W tensor (uint8, or float in [0, 1], any size) preprocesses as the run did.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.utils import get_class
from torch.utils.data import DataLoader
from tqdm import tqdm

from anomalib_lite.callbacks.heatmaps import heatmap_name, render_heatmap
from anomalib_lite.data.batch import Batch, collate_items
from anomalib_lite.data.samples import IMAGE_EXTENSIONS, AnomalyDataset, ImageResize, Sample, is_image_file
from anomalib_lite.errors import UserInputError, find_user_error, one_line
from anomalib_lite.models.components import AnomalyModule
from anomalib_lite.run_dir import check_writable

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoints/model.ckpt"  # where a run keeps its model (train.py)
MAX_PENDING = 64  # heatmaps handed to the writer thread and not yet written: bounds the images held


def find_checkpoint(path: str | Path) -> Path:
    """A run dir (its checkpoints/model.ckpt) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        if (path / CHECKPOINT_NAME).is_file():
            return path / CHECKPOINT_NAME
        raise UserInputError(f"{path} holds no {CHECKPOINT_NAME}: give a finished run's folder or a .ckpt file")
    if not path.is_file():
        raise UserInputError(f"no such run folder or checkpoint: {path}")
    return path


def _run_dir(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def _stored_settings(checkpoint: Path, stored: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(method class path, resize settings) from the checkpoint, or from its run's config.yaml for
    checkpoints written before the checkpoint carried them."""
    info = stored.get("anomalib_lite")
    if info:
        return info["method_class"], info["preprocessing"]
    config_path = _run_dir(checkpoint) / "config.yaml"
    if not config_path.is_file():
        raise UserInputError(
            f"{checkpoint} is not an anomalib-lite checkpoint (no method recorded, and no config.yaml beside its run)"
        )
    config = yaml.safe_load(config_path.read_text())
    dataset = config.get("dataset", {})
    return config["method"]["_target_"], {"image_size": dataset["image_size"], "crop_size": dataset.get("crop_size")}


def load_model(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> AnomalyModule:
    """The method of a run (its folder or a checkpoint file), in eval mode, with its preprocessing."""
    path = find_checkpoint(checkpoint)
    try:
        stored = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserInputError(f"cannot read checkpoint {path}: {one_line(str(error))}") from None
    class_path, preprocessing = _stored_settings(path, stored)
    del stored
    module_class = get_class(class_path)
    model = module_class.load_from_checkpoint(path, map_location=map_location, weights_only=False)
    if preprocessing is not None:
        model.image_resize = ImageResize(**preprocessing)
    if torch.isnan(model.image_threshold):
        raise UserInputError(f"{path} holds no fitted thresholds: it was saved before validation finished")
    return model.eval()


def list_image_files(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(image file, its folder relative to the given folder) for every image under `paths`
    (folders are searched recursively, hidden files and `*_mask` files skipped)."""
    found: list[tuple[Path, str]] = []
    for given in map(Path, paths):
        if given.is_file():
            found.append((given, ""))
        elif given.is_dir():
            for file in sorted(given.rglob("*")):
                relative = file.relative_to(given)
                if file.is_file() and is_image_file(file) and not any(part.startswith(".") for part in relative.parts):
                    found.append((file, relative.parent.as_posix() if relative.parent != Path(".") else ""))
        else:
            raise UserInputError(f"no such image folder or file: {given}")
    if not found:
        raise UserInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {', '.join(map(str, paths))}")
    return found


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


def _prepare_output(output: Path, overwrite: bool) -> None:
    if (output / "predictions.csv").exists() and not overwrite:
        raise UserInputError(f"{output} already holds predictions.csv: pass --overwrite to replace it, or --output another folder")
    check_writable(output, "--output")
    output.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(output / "heatmaps", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anomalib-lite-predict", description="Score images with a finished run's model: predictions.csv and heatmaps."
    )
    parser.add_argument("run", help="a finished run's folder (or its checkpoints/model.ckpt)")
    parser.add_argument("images", nargs="+", help="image folders (searched recursively) or files")
    parser.add_argument("--output", type=Path, help="where to write (default: <run>/predict/<first folder's name>)")
    parser.add_argument("--max-heatmaps", type=int, default=None, help="heatmaps to write (default: all; 0: none)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image reading processes")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier predictions in --output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        return _predict(args)
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        print(f"anomalib-lite-predict: error: {one_line(str(user_error))}", file=sys.stderr, flush=True)
        return UserInputError.exit_code


def _predict(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_heatmaps is not None and args.max_heatmaps < 0:
        raise UserInputError(f"--max-heatmaps must be 0 or more, got {args.max_heatmaps}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    checkpoint = find_checkpoint(args.run)
    files = list_image_files(args.images)
    output = args.output or _run_dir(checkpoint) / "predict" / (Path(args.images[0]).resolve().name or "images")
    _prepare_output(output, args.overwrite)
    model = load_model(checkpoint, map_location=device)
    threshold = float(model.image_threshold)
    scale = (float(model.pixel_floor), float(model.pixel_threshold))
    log.info(
        "%s: %d images, resized as the run (%s), image threshold %.4g", checkpoint, len(files),
        model.image_resize.settings(), threshold,
    )
    folders = dict(files)
    max_heatmaps = len(files) if args.max_heatmaps is None else args.max_heatmaps
    rows, pending = [], deque()
    start = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="heatmaps") as pool, tqdm(
        total=len(files), unit="img", disable=None, desc="predict"
    ) as bar:
        batches = predict_batches(model, [f for f, _ in files], args.batch_size, args.workers)
        for batch, scores, maps in batches:
            normalized = model.normalize_anomaly_map(maps.to(model.device)).cpu()
            for i, image_path in enumerate(batch.image_path):
                path = Path(image_path)
                folder, score = folders[path], float(scores[i])
                anomalous = score > threshold
                rows.append((str(path), folder, f"{score:.9g}", int(anomalous)))
                if len(rows) <= max_heatmaps:
                    title = f"{folder}/{path.name}" if folder else path.name
                    text = f"score {score:.3g}, threshold {threshold:.3g}: {'ANOMALOUS' if anomalous else 'normal'}"
                    target = output / "heatmaps" / folder / heatmap_name(path.name)
                    while len(pending) >= MAX_PENDING:
                        pending.popleft().result()  # re-raises a worker's error
                    pending.append(pool.submit(_save_heatmap, batch.image[i], normalized[i], title, text, scale, anomalous, target))
            bar.update(len(batch))
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


def _save_heatmap(image: torch.Tensor, normalized: torch.Tensor, title: str, text: str, scale: tuple[float, float], anomalous: bool, target: Path) -> None:
    sheet = render_heatmap(image, None, normalized, title, text, scale=scale, anomalous=anomalous)
    target.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(target)


if __name__ == "__main__":
    sys.exit(main())
