"""The `anomalib-lite` command: the checks that need no model (one line, exit 2), then Hydra,
which calls `train.run` once per job.

Kept free of torch and Lightning at import: a mistyped option, `--help` or `--cfg job` answers
in about a second, and the ~10 s of importing Lightning is paid only by a run that starts.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from anomalib_lite.config import CONFIG_DIR, backbone_override_error, check_config
from anomalib_lite.errors import Interrupted, UserInputError, find_user_error, one_line, stop_on_signals
from anomalib_lite.run_dir import RunDirLock, check_run_dir, remove_stale_staging
from anomalib_lite.sweeps import sweep_status

# Where launchers put a process's rank (Lightning's DDP workers, torchrun, SLURM, LSF), as Lightning reads it.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def process_rank() -> int:
    """This process's rank among a distributed run's processes (0 when it is not one of them)."""
    for name in RANK_VARIABLES:
        if os.environ.get(name) is not None:
            return int(os.environ[name])
    return 0


def _fail(message: str, exit_code: int = UserInputError.exit_code) -> None:
    print(f"anomalib-lite: error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    """One job. In a sweep a failed job does not stop the others: it says why in one line (its
    folder's train.log has the rest) and the sweep goes on; `SweepReport` sums up at the end."""
    from anomalib_lite.train import run  # torch and Lightning: only once a job runs

    _quiet_third_party()  # again: a launcher's worker process (joblib, submitit) runs only this function
    _apply_logger_levels()
    try:
        results = run(cfg)
    except Exception as error:
        user_error = find_user_error(error)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            if user_error is None:
                raise
            _fail(str(user_error))
        job = f"job {HydraConfig.get().job.num} ({Path(cfg.paths.output_dir).name})"
        reason = one_line(str(user_error or error)) or type(error).__name__
        print(f"anomalib-lite: error: {job} failed: {reason}; the sweep goes on", file=sys.stderr, flush=True)
        return None
    return results.get(cfg.get("optimized_metric"))


def precheck(args: list[str]) -> str | None:
    """The error line for a single run that cannot start, else None; checked before Hydra creates anything.

    Composes the config as Hydra will: the settings (typed schema), the run dir (writable, not
    holding a finished run unless overwrite=true). A leftover staging folder of a failed attempt
    is cleared. Sweeps are checked per job, in `run`; composition errors are Hydra's to report.
    """
    if process_rank() != 0 or any(arg.startswith("-") for arg in args):
        return None  # a DDP worker process, a sweep (-m), or --cfg/--help/...
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=args, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        run_dir = Path(str(cfg.hydra.run.dir))
    except Exception:  # noqa: BLE001 - Hydra reports composition problems itself
        return None
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    try:
        check_config(cfg)
        check_run_dir(run_dir, bool(cfg.get("overwrite", False)))
        RunDirLock.acquire(run_dir)  # held until the process ends: a second run into the folder is refused
    except UserInputError as error:
        return str(error)
    remove_stale_staging(run_dir)
    return None


class SweepReport(Callback):
    """At the end of a sweep (in the process that launched it, whatever the launcher): which jobs
    failed and why, and which never ran; the command then exits 1."""

    failed = False

    def on_multirun_end(self, config: DictConfig, **kwargs: object) -> None:
        status = sweep_status(Path(str(config.hydra.sweep.dir)))
        for line in status.summary_lines():
            print(f"anomalib-lite: {line}", file=sys.stderr, flush=True)
        SweepReport.failed = bool(status.failed or status.missing)


def main() -> None:
    """The console entry point."""
    _quiet_third_party()
    SweepReport.failed = False
    try:
        with stop_on_signals():
            message = backbone_override_error(sys.argv[1:]) or precheck(sys.argv[1:])
            if message is not None:
                _fail(message)
            hydra_main()
    except Interrupted as interrupted:
        _fail(f"{interrupted}: the run stopped; an earlier finished run in its folder is as it was", interrupted.exit_code)
    finally:
        RunDirLock.release_all()  # the process may go on (the Python API, tests): the folders are free again
    if SweepReport.failed:
        sys.exit(1)


def _apply_logger_levels() -> None:
    """The levels of the job's logging config again: Lightning resets its loggers to INFO when it is
    first imported, which in a sweep's job happens after Hydra applied the config (its device
    lines, tips and "fit stopped" would print for every job)."""
    for name, settings in (HydraConfig.get().job_logging.get("loggers") or {}).items():
        if settings and settings.get("level"):
            logging.getLogger(name).setLevel(settings["level"])


def _quiet_third_party() -> None:
    """Warnings a user cannot act on stay out of the output (and the log)."""
    for pattern in (
        r".*configure_optimizers.* returned .None.*",  # memory-bank methods have nothing to optimise
        r".*module\(s\) in eval mode.*",  # frozen backbones are in eval mode on purpose
        r".*does not have many workers.*",  # num_workers is the user's setting, documented in the dataset yaml
        r".*LeafSpec.*is deprecated.*",  # inside Lightning's pytree helpers
        # DDP: validation and test results are gathered by dataset index, padded duplicates dropped
        # (utils.distributed), and the logged metrics are computed from that gathered set, the same on
        # every rank: the sampler's padding and sync_dist=False are deliberate.
        r".*Using `DistributedSampler` with the dataloaders\. During `trainer\.(validate|test)\(\)`.*",
        r".*It is recommended to use `self\.log\(.*sync_dist=True\)`.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|lightning|timm|hydra|omegaconf)\b.*")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # DDP worker processes and loaders


if __name__ == "__main__":
    main()
