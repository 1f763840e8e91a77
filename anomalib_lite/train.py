"""The `anomalib-lite` command: fit on normal images, validate on held-out normal images (thresholds,
label-free selection metrics), test, and write metrics.json, heatmaps/, logs and a checkpoint
into the run's output dir."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from anomalib_lite.callbacks import ReportingCallback
from anomalib_lite.config import CONFIG_DIR, backbone_override_error, check_config, method_name, uses_backbone
from anomalib_lite.data import AnomalyDataModule
from anomalib_lite.errors import UserInputError
from anomalib_lite.models.components import AnomalyModule

log = logging.getLogger(__name__)

METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1max", "pixel_f1max")


def build_trainer(trainer_cfg: DictConfig, module: AnomalyModule, name: str, **components: Any) -> L.Trainer:
    """The configured Trainer, with the settings the method needs applied over the config.

    A setting the config gives explicitly and the method replaces is said in one log line.
    """
    settings: dict[str, Any] = OmegaConf.to_container(trainer_cfg, resolve=True)
    for key, value in module.trainer_settings(settings).items():
        if settings.get(key) is not None and settings[key] != value:
            log.warning("%s needs trainer.%s=%s: the configured %s is not used", name, key, value, settings[key])
        settings[key] = value
    return instantiate(settings, **components)


def run(cfg: DictConfig) -> dict[str, Any]:
    """One experiment; returns what it writes to metrics.json."""
    check_config(cfg)  # config mistakes first: nothing is read or written before they are ruled out
    name = method_name(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    datamodule: AnomalyDataModule = instantiate(cfg.dataset)
    datamodule.prepare_data()
    datamodule.setup("fit")  # reads and checks the data before any model is built
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # Not recursive: optimiser, scheduler and sampler specs reach the method as plain dicts (it
    # builds them), so its hyperparameters, and the checkpoint, hold plain data only.
    module: AnomalyModule = instantiate(cfg.method, _convert_="all", _recursive_=False)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = build_trainer(cfg.trainer, module, name, callbacks=callbacks, logger=loggers)

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    # Trained methods go on with their best epoch's weights (restored from its checkpoint).
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    start = time.perf_counter()
    trainer.validate(module, datamodule=datamodule, verbose=False, ckpt_path=best_path or None)
    validate_seconds = time.perf_counter() - start
    checkpoint = output_dir / "checkpoints" / "model.ckpt"
    trainer.save_checkpoint(checkpoint, weights_only=False)  # full: hyperparameters rebuild the method
    start = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start

    results: dict[str, Any] = {key: None for key in METRIC_KEYS}
    for callback in trainer.callbacks:
        if isinstance(callback, ReportingCallback):
            results.update(callback.report())
    results.update(module.validation_results)
    results.update(
        fit_seconds=round(fit_seconds, 2),
        validate_seconds=round(validate_seconds, 2),
        test_seconds=round(test_seconds, 2),
        # The test phase split: the loop's inference, then the metrics, and what heatmaps held it up.
        test_inference_seconds=round(test_seconds - results.get("metrics_seconds", 0) - results.get("heatmap_seconds", 0), 2),
        method=name,
        backbone=cfg.method.backbone.name if uses_backbone(cfg) else None,
        weights=str(cfg.method.backbone.weights) if uses_backbone(cfg) else None,
        dataset=datamodule.dataset_name,
        category=datamodule.category,
        image_size=list(datamodule.resize.output_size),
        seed=cfg.seed,
        epochs=trainer.max_epochs,
        best_epoch=_checkpoint_epoch(best_path),
        num_shots=datamodule.num_shots,
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
        _report(results, output_dir)
    return results


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
        + (f"  (best epoch {results['best_epoch']} of {results['epochs']})" if results["best_epoch"] else ""),
        f"  metrics:  {output_dir / 'metrics.json'}",
    ]
    if results.get("heatmaps"):
        lines.append(f"  heatmaps: {results['heatmaps']}")
    print("\n".join(lines), flush=True)


def _user_input_error(error: BaseException) -> UserInputError | None:
    """The UserInputError behind `error`, if any (Hydra's instantiate wraps exceptions)."""
    while error is not None:
        if isinstance(error, UserInputError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _fail(message: str) -> None:
    # DataLoader workers wrap exceptions with a traceback: keep the message's last line.
    print(f"anomalib-lite: error: {message.strip().splitlines()[-1]}", file=sys.stderr, flush=True)
    sys.exit(UserInputError.exit_code)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except Exception as error:
        user_error = _user_input_error(error)
        if user_error is None:
            raise
        _fail(str(user_error))
    return results.get(cfg.get("optimized_metric"))


def main() -> None:
    """The console entry point: one check Hydra cannot make with a clear message, then Hydra."""
    message = backbone_override_error(sys.argv[1:])
    if message is not None:
        _fail(message)
    hydra_main()


if __name__ == "__main__":
    main()
