"""One experiment: fit on normal images, validate on held-out normal images (thresholds,
label-free selection metrics), test, and write metrics.json, heatmaps/, logs and a checkpoint
into the run's output dir. The `anomalib-lite` command (`cli.py`) calls `run` per Hydra job."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from anomalib_lite.callbacks import ReportingCallback
from anomalib_lite.config import check_config, method_name, uses_backbone
from anomalib_lite.data import AnomalyDataModule
from anomalib_lite.engine import VALIDATION_METRICS, AnomalyModule
from anomalib_lite.engine.checkpoint import CHECKPOINT_NAME
from anomalib_lite.errors import UserInputError
from anomalib_lite.metrics import tidy
from anomalib_lite.models.components import FittedOnEmbeddings
from anomalib_lite.run_dir import STAGING, RunDirLock, StagedRun, check_run_dir, remove_stale_staging

log = logging.getLogger(__name__)

METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max", "pixel_f1max")


def build_trainer(trainer_cfg: DictConfig, module: AnomalyModule, name: str, **components: Any) -> L.Trainer:
    """The configured Trainer, with the settings the method needs applied over the config.

    A setting the config gives explicitly and the method replaces is said in one log line.
    """
    settings: dict[str, Any] = OmegaConf.to_container(trainer_cfg, resolve=True)
    if not any(isinstance(c, ProgressBar) for c in components.get("callbacks", [])):
        settings["enable_progress_bar"] = False  # `~callbacks.progress` means none, not Lightning's default bar
    for key, value in module.trainer_settings(settings).items():
        if settings.get(key) is not None and settings[key] != value:
            log.warning("%s needs trainer.%s=%s: the configured %s is not used", name, key, value, settings[key])
        settings[key] = value
    return instantiate(settings, **components)


def run(cfg: DictConfig) -> dict[str, Any]:
    """One experiment; returns what it writes to metrics.json.

    Its files are staged and moved into the run dir only when it succeeds (`run_dir.StagedRun`).
    """
    check_config(cfg)  # config mistakes first: nothing is read or written before they are ruled out
    run_dir = Path(cfg.paths.output_dir)
    is_writer = rank_zero_only.rank == 0  # DDP: the other ranks' processes write into the same staging
    # A sweep's job takes its folder's lock here; a single run's command took it already (cli.precheck).
    locked_here = is_writer and RunDirLock.acquire(run_dir)
    try:
        if is_writer:
            try:
                check_run_dir(run_dir, bool(cfg.get("overwrite", False)))
            except UserInputError:
                remove_stale_staging(run_dir)  # what Hydra just staged there (only ours is removed)
                raise
        staged = copy.deepcopy(cfg)
        with open_dict(staged):
            staged.paths.output_dir = str(run_dir / STAGING)
        with StagedRun(run_dir, is_writer) as stage:
            try:
                results = _run(staged, cfg, run_dir)
            except BaseException:
                if is_writer and stage.has_earlier_run:
                    log.error("%s is left as it was; this attempt's files are in %s", run_dir, stage.staging)
                raise
    finally:
        if locked_here:
            RunDirLock.release(run_dir)
    if is_writer:
        _report(results, run_dir)
    return results


def _run(cfg: DictConfig, original: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The run, writing into `cfg.paths.output_dir` (the staging folder); paths it reports are `run_dir`'s."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(original, resolve=True))
    module = build_method(cfg, datamodule)
    trainer = build_trainer(cfg.trainer, module, method_name(cfg), callbacks=build_callbacks(cfg), logger=build_loggers(cfg))
    timings, best_path = fit_and_validate(trainer, module, datamodule)
    checkpoint = output_dir / CHECKPOINT_NAME
    trainer.save_checkpoint(checkpoint, weights_only=False)  # full: hyperparameters rebuild the method
    start = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    timings["test_seconds"] = time.perf_counter() - start
    results = gather_results(cfg, trainer, module, datamodule, timings, best_path)
    results["checkpoint"] = str(run_dir / CHECKPOINT_NAME)
    if results.get("heatmaps"):
        results["heatmaps"] = str(run_dir / Path(results["heatmaps"]).relative_to(output_dir))
    log.info("test on %d images: %s", len(datamodule.test_samples), ", ".join(
        f"{key} {'n/a' if results.get(key) is None else f'{results[key]:.4f}'}" for key in METRIC_KEYS
    ) + (f" ({results['pixel_metrics_note']})" if results.get("pixel_metrics_note") else ""))
    _close_loggers(trainer)
    trainer.strategy.barrier()  # every rank has written its share (heatmaps) before rank 0 moves the files
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def build_datamodule(cfg: DictConfig) -> AnomalyDataModule:
    """The configured data, read and checked (before any model is built)."""
    datamodule: AnomalyDataModule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def build_method(cfg: DictConfig, datamodule: AnomalyDataModule) -> AnomalyModule:
    """The configured method, given the run's preprocessing; the data module is told what the
    method needs of it."""
    # Not recursive: optimiser, scheduler and sampler specs reach the method as plain dicts (it
    # builds them), so its hyperparameters, and the checkpoint, hold plain data only.
    module: AnomalyModule = instantiate(cfg.method, _convert_="all", _recursive_=False)
    module.image_resize = datamodule.resize  # the checkpoint carries it: the model scores raw images alone
    datamodule.train_shuffle = module.train_shuffle
    if datamodule.num_labelled_anomalies and not module.uses_labelled_anomalies:
        log.info(
            "%s learns from normal images only: the %d labelled anomalies (dataset.num_labelled_anomalies) are just "
            "left out of its test set", method_name(cfg), datamodule.num_labelled_anomalies,
        )
    return module


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]


def build_loggers(cfg: DictConfig) -> list[Logger]:
    if any(str(node.get("_target_", "")).endswith("WandbLogger") for node in (cfg.get("logger") or {}).values()):
        # W&B's own start-up and closing lines (36 of them, one naming the staging folder that is gone
        # after the run): the run's report names its files instead. WANDB_SILENT=false brings them back.
        os.environ.setdefault("WANDB_SILENT", "true")
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._wandb_init.get("anonymous", False) is None:
            # Lightning passes anonymous=None, which wandb warns about as a deprecated setting: a line
            # nobody can act on. Not passed, it is wandb's default.
            logger._wandb_init.pop("anonymous")
    return loggers


def fit_and_validate(
    trainer: L.Trainer, module: AnomalyModule, datamodule: AnomalyDataModule
) -> tuple[dict[str, float], str]:
    """Fit, then validate the weights kept (trained methods: their best epoch's, restored from its
    checkpoint), which fits the post-processor. Returns the timings and the best epoch's checkpoint."""
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    start = time.perf_counter()
    trainer.validate(module, datamodule=datamodule, verbose=False, ckpt_path=best_path or None, weights_only=True)
    validate_seconds = time.perf_counter() - start
    post_processor = module.post_processor
    log.info(
        "thresholds fitted on %d held-out normal images: image %.4g, pixel %.4g%s", len(datamodule.val_samples),
        float(post_processor.image_threshold), float(post_processor.pixel_threshold),
        "".join(f", {k} {v:.4f}" for k, v in module.validation_results.items() if v is not None),
    )
    return {"fit_seconds": fit_seconds, "validate_seconds": validate_seconds}, best_path


def gather_results(
    cfg: DictConfig, trainer: L.Trainer, module: AnomalyModule, datamodule: AnomalyDataModule,
    timings: Mapping[str, float], best_path: str,
) -> dict[str, Any]:
    """What metrics.json holds: the callbacks' reports, the label-free validation metrics, what the
    model's fit found, the timings and the run's settings."""
    results: dict[str, Any] = {key: None for key in METRIC_KEYS}
    for callback in trainer.callbacks:
        if isinstance(callback, ReportingCallback):
            results.update(callback.report())
    results.update(module.validation_results)
    if isinstance(module.model, FittedOnEmbeddings):
        results.update(module.model.fit_report)
    test_seconds = timings["test_seconds"]
    results.update(
        fit_seconds=round(timings["fit_seconds"], 2),
        validate_seconds=round(timings["validate_seconds"], 2),
        test_seconds=round(test_seconds, 2),
        # The test phase split: the loop's inference, then the metrics, and what heatmaps held it up.
        test_inference_seconds=round(test_seconds - results.get("metrics_seconds", 0) - results.get("heatmap_seconds", 0), 2),
        method=method_name(cfg),
        backbone=cfg.method.backbone.name if uses_backbone(cfg) else None,
        weights=str(cfg.method.backbone.weights) if uses_backbone(cfg) else None,
        dataset=datamodule.dataset_name,
        category=datamodule.category,
        image_size=list(datamodule.resize.output_size),
        seed=cfg.seed,
        epochs=trainer.max_epochs,
        best_epoch=_checkpoint_epoch(best_path),
        num_shots=datamodule.num_shots,
        num_labelled_anomalies=datamodule.num_labelled_anomalies,
        num_train_images=len(datamodule.train_samples),
        num_val_images=len(datamodule.val_samples),
        image_threshold=float(module.post_processor.image_threshold),
        pixel_threshold=float(module.post_processor.pixel_threshold),
        world_size=trainer.world_size,
    )
    results["num_empty_defect_masks"] = len(datamodule.report.empty_masks)
    for key in (*METRIC_KEYS, "image_ap", "pixel_ap", "image_f1_at_val_threshold", *VALIDATION_METRICS):
        if key in results:
            results[key] = tidy(results[key])
    return results


def _close_loggers(trainer: L.Trainer) -> None:
    """Loggers write their last files now, before the run's folder moves into place: a W&B run
    stays open after test (its service process would go on writing into the staging folder)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()
        else:
            logger.finalize("success")


def _checkpoint_epoch(path: str) -> int | None:
    """The 1-based epoch a Lightning checkpoint was written in (None without one)."""
    if not path:
        return None
    # mmap: only the header is read, not the weights validate() has just loaded.
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]) + 1


def _report(results: Mapping[str, Any], output_dir: Path) -> None:
    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    header = " | ".join(str(part) for part in (results["method"], results["backbone"]) if part)
    lines = [
        f"{header} | {results['dataset']}/{results['category']}",
        "  " + "  ".join(f"{key} {fmt(results[key])}" for key in METRIC_KEYS),
        f"  fit {results['fit_seconds']:.1f} s  test {results['test_seconds']:.1f} s"
        + (f"  (tested epoch {results['best_epoch']} of {results['epochs']})" if results["best_epoch"] else ""),
        f"  metrics:  {output_dir / 'metrics.json'}",
    ]
    if results.get("pixel_metrics_note"):
        lines.insert(2, f"  {results['pixel_metrics_note']}")
    if results.get("heatmaps"):
        lines.append(f"  heatmaps: {results['heatmaps']}")
    for wandb_run in sorted((output_dir / "logs" / "wandb").glob("offline-run-*")):
        lines.append(f"  wandb:    {wandb_run} (offline; to upload: wandb sync {wandb_run})")
    print("\n".join(lines), flush=True)
