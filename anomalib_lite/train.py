"""The `anomalib-lite` command: fit on normal images, fit thresholds on held-out normal images,
test, and write metrics.json, heatmaps/, logs and a checkpoint into the run's output dir."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from anomalib_lite.callbacks import AnomalyMetrics, EpochTimer
from anomalib_lite.config import CONFIG_DIR, check_config
from anomalib_lite.errors import UserInputError

METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max", "pixel_f1max")


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _dataset_name(datamodule: L.LightningDataModule) -> str:
    return type(datamodule).__name__.removesuffix("DataModule").lower()


def run(cfg: DictConfig) -> dict[str, Any]:
    """One experiment; returns what it writes to metrics.json."""
    check_config(cfg)  # config mistakes first: nothing is read or written before they are ruled out
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")  # reads and checks the data before any model is built
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # _convert_="all": plain lists and dicts as hyperparameters, so checkpoints load with weights_only.
    module = instantiate(cfg.method, backbone=OmegaConf.to_container(cfg.backbone, resolve=True), _convert_="all")
    datamodule.shuffle_train = module.shuffle_train  # memory banks read the training set once, in order
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    best_epoch_checkpoint = _best_epoch_checkpoint(module, output_dir)
    if best_epoch_checkpoint is not None:
        callbacks.append(best_epoch_checkpoint)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, **module.trainer_arguments)

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # Trained methods go on with their best epoch's weights (restored from its checkpoint).
    best_path = best_epoch_checkpoint.best_model_path if best_epoch_checkpoint is not None else ""
    trainer.validate(module, datamodule=datamodule, verbose=False, ckpt_path=best_path or None)
    validate_seconds = time.perf_counter() - start
    checkpoint = output_dir / "checkpoints" / "model.ckpt"
    trainer.save_checkpoint(checkpoint, weights_only=False)  # full: hyperparameters reload the method
    start = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start

    metrics_callback = next((c for c in callbacks if isinstance(c, AnomalyMetrics)), None)
    results: dict[str, Any] = {key: None for key in METRIC_KEYS}
    results.update(metrics_callback.results if metrics_callback else {})
    for timer in (c for c in callbacks if isinstance(c, EpochTimer)):
        results.update(timer.results)
    results.update(
        fit_seconds=round(fit_seconds, 2),
        validate_seconds=round(validate_seconds, 2),
        test_seconds=round(test_seconds, 2),
        method=_snake_case(type(module).__name__),  # CsFlow -> cs_flow, as its config
        backbone=cfg.backbone.name,
        weights=str(cfg.backbone.weights),
        dataset=_dataset_name(datamodule),
        category=getattr(datamodule, "category", None) or Path(datamodule.name).name,
        epochs=trainer.max_epochs,
        best_epoch=_checkpoint_epoch(best_path),
        num_shots=getattr(datamodule, "num_shots", None),
        num_train_images=len(datamodule.train_samples),
        num_val_images=len(datamodule.val_samples),
        image_threshold=float(module.image_threshold),
        pixel_threshold=float(module.pixel_threshold),
        world_size=trainer.world_size,
        checkpoint=str(checkpoint),
    )
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        _report(results, output_dir, callbacks)
    return results


def _best_epoch_checkpoint(module: L.LightningModule, output_dir: Path) -> ModelCheckpoint | None:
    """For trained methods: keep the epoch with the best validation signal (no test labels)."""
    monitor = getattr(module, "checkpoint_monitor", None)
    if monitor is None:
        return None
    return ModelCheckpoint(
        dirpath=output_dir / "checkpoints", filename="best_epoch", monitor=monitor, mode="min",
        save_top_k=1, save_weights_only=True, enable_version_counter=False,
    )


def _checkpoint_epoch(path: str) -> int | None:
    """The 1-based epoch a Lightning checkpoint was written in (None without one)."""
    if not path:
        return None
    # mmap: only the header is read, not the weights validate() has just loaded.
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]) + 1


def _report(results: dict[str, Any], output_dir: Path, callbacks: list) -> None:
    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"{results['method']} | {results['backbone']} | {results['dataset']}/{results['category']}",
        "  " + "  ".join(f"{key} {fmt(results[key])}" for key in METRIC_KEYS),
        f"  fit {results['fit_seconds']:.1f} s  test {results['test_seconds']:.1f} s"
        + (f"  (best epoch {results['best_epoch']} of {results['epochs']})" if results["best_epoch"] else ""),
        f"  metrics:  {output_dir / 'metrics.json'}",
    ]
    heatmap_dirs = [str(c.output_dir) for c in callbacks if hasattr(c, "output_dir")]
    if heatmap_dirs:
        lines.append(f"  heatmaps: {heatmap_dirs[0]}")
    print("\n".join(lines), flush=True)


def _user_input_error(error: BaseException) -> UserInputError | None:
    """The UserInputError behind `error`, if any (Hydra's instantiate wraps exceptions)."""
    while error is not None:
        if isinstance(error, UserInputError):
            return error
        error = error.__cause__ or error.__context__
    return None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except Exception as error:
        user_error = _user_input_error(error)
        if user_error is None:
            raise
        # DataLoader workers wrap exceptions with a traceback: keep the message's last line.
        message = str(user_error).strip().splitlines()[-1]
        print(f"anomalib-lite: error: {message}", file=sys.stderr, flush=True)
        sys.exit(UserInputError.exit_code)
    return results.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
