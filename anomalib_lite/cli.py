"""The `anomalib-lite` command: the checks that need no model (one line, exit 2), then Hydra,
which calls `train.run` once per job.

Kept free of torch and Lightning at import: a mistyped option, `--help` or `--cfg job` answers
in about a second, and the ~10 s of importing Lightning is paid only by a run that starts.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from anomalib_lite.config import CONFIG_DIR, backbone_override_error, check_config
from anomalib_lite.errors import UserInputError, find_user_error, one_line
from anomalib_lite.run_dir import check_run_dir, remove_stale_staging

# Where launchers put a process's rank (Lightning's DDP workers, torchrun, SLURM, LSF), as Lightning reads it.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def process_rank() -> int:
    """This process's rank among a distributed run's processes (0 when it is not one of them)."""
    for name in RANK_VARIABLES:
        if os.environ.get(name) is not None:
            return int(os.environ[name])
    return 0


def _fail(message: str) -> None:
    print(f"anomalib-lite: error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(UserInputError.exit_code)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from anomalib_lite.train import run  # torch and Lightning: only once a job runs

    try:
        results = run(cfg)
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        _fail(str(user_error))
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
    from hydra.core.hydra_config import HydraConfig

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
    except UserInputError as error:
        return str(error)
    remove_stale_staging(run_dir)
    return None


def main() -> None:
    """The console entry point."""
    _quiet_third_party()
    message = backbone_override_error(sys.argv[1:]) or precheck(sys.argv[1:])
    if message is not None:
        _fail(message)
    hydra_main()


def _quiet_third_party() -> None:
    """Warnings a user cannot act on stay out of the output (and the log)."""
    for pattern in (
        r".*configure_optimizers.* returned .None.*",  # memory-bank methods have nothing to optimise
        r".*module\(s\) in eval mode.*",  # frozen backbones are in eval mode on purpose
        r".*does not have many workers.*",  # num_workers is the user's setting, documented in the dataset yaml
        r".*LeafSpec.*is deprecated.*",  # inside Lightning's pytree helpers
    ):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|lightning|timm|hydra|omegaconf)\b.*")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # DDP worker processes and loaders


if __name__ == "__main__":
    main()
