"""A run's output folder: never reused by accident, never left half-replaced.

A run writes everything (checkpoints, logs, heatmaps, predictions, metrics.json, train.log,
Hydra's .hydra/) into `<run dir>/.incomplete/` and moves it into place only when it succeeds:
  - a run dir that holds a finished run (metrics.json) is refused unless `overwrite=true`; then
    the earlier run's files are replaced only once the new run has succeeded;
  - a run that fails leaves an earlier run untouched (its files stay in `.incomplete/`, whose
    train.log says why); into a run dir without an earlier run, its files are moved up, so the
    failed run's folder says why it failed.
Only the files a run writes (`RUN_ITEMS`) are ever removed from a run dir.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from anomalib_lite.errors import UserInputError, find_user_error, one_line

STAGING = ".incomplete"
# Everything a run writes at the top of its folder (loggers included); nothing else is touched.
RUN_ITEMS = (
    ".hydra", "config.yaml", "metrics.json", "predictions.csv", "train.log", "checkpoints", "heatmaps", "logs",
    "tensorboard", "wandb", "predict",
)
LOG_FORMAT = "[%(asctime)s] %(message)s"


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, setting: str) -> None:
    """`path` (a folder) exists and is writable, or can be created: else one line naming `setting`.

    Tried with a temporary file rather than asked of the permission bits, which do not tell for
    root or for read-only file systems.
    """
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise UserInputError(f"{setting}: {existing} is not a folder (needed for {path})")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError:
        where = "is not writable" if existing == path.absolute() else f"cannot be created: {existing} is not writable"
        raise UserInputError(f"{setting}: {path} {where}") from None


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A finished run in `run_dir` is refused unless `overwrite`; the folder must be writable."""
    check_writable(run_dir, "run dir (hydra.run.dir)")
    if (run_dir / "metrics.json").is_file() and not overwrite:
        raise UserInputError(
            f"{run_dir} holds a finished run (metrics.json): pass overwrite=true to replace it once the new run "
            "succeeds, or choose another hydra.run.dir"
        )


def remove_stale_staging(run_dir: Path) -> None:
    """A failed attempt's leftovers: removed before a new attempt stages its files there."""
    staging = run_dir / STAGING
    if staging.is_dir():
        shutil.rmtree(staging)


class StagedRun:
    """The run's files go to `staging`; `commit()` moves them into `run_dir`, `fail()` keeps or moves them.

    While active, the root logger also writes to `staging/train.log` (the run's own log).
    """

    def __init__(self, run_dir: Path, is_writer: bool = True) -> None:
        self.run_dir = run_dir
        self.staging = run_dir / STAGING
        self.is_writer = is_writer  # the process that commits (rank 0); the others only write into staging
        self._handler: logging.Handler | None = None

    def __enter__(self) -> StagedRun:
        self.staging.mkdir(parents=True, exist_ok=True)
        if self.is_writer:
            for item in self.staging.iterdir():  # a failed attempt's files, but Hydra's fresh record
                if item.name != ".hydra":
                    _remove(item)
            self._handler = logging.FileHandler(self.staging / "train.log")
            self._handler.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
            logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(self, kind, error, traceback) -> None:  # noqa: ANN001
        if not self.is_writer:
            return
        if error is not None:
            user_error = find_user_error(error)
            message = one_line(str(user_error or error)) or type(error).__name__
            # A user mistake is one line; anything else keeps its traceback in train.log.
            logging.getLogger(__name__).error(
                "the run failed: %s", message, exc_info=user_error is None and not isinstance(error, KeyboardInterrupt)
            )
        self._close_log()
        if error is None:
            self.commit()
        else:
            self.fail()

    def _close_log(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    @property
    def has_earlier_run(self) -> bool:
        return (self.run_dir / "metrics.json").is_file()

    def _move_up(self) -> None:
        for item in list(self.staging.iterdir()):
            target = self.run_dir / item.name
            _remove(target)
            os.replace(item, target)
        self.staging.rmdir()

    def commit(self) -> None:
        """The run succeeded: the earlier run's files (if any) go, the new ones take their place."""
        for name in RUN_ITEMS:
            _remove(self.run_dir / name)
        self._move_up()

    def fail(self) -> None:
        """The run failed: an earlier run stays as it was; otherwise the failed run's files move up."""
        if self.has_earlier_run:
            return
        self._move_up()


def _remove(path: Path) -> None:
    """A file, link or folder, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
