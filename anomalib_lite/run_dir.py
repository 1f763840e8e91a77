"""A run's output folder: never reused by accident, never left half-replaced, and nothing in it
removed that the run did not write.

A run writes everything (checkpoints, logs, heatmaps, predictions, metrics.json, train.log,
Hydra's .hydra/) into `<run dir>/.incomplete/` and moves it into place only when it succeeds:
  - a run goes only into a new or empty folder, or into a folder of an earlier run of ours (it
    carries `.anomalib_lite_run.json`, the list of the files that run wrote); a folder holding
    anything else is refused, whatever `overwrite` says;
  - a folder holding a finished run (metrics.json) is refused unless `overwrite=true`; then the
    earlier run's files (those on its list, and no other) are replaced once the new run has
    succeeded;
  - a run that fails leaves an earlier finished run untouched (its files stay in `.incomplete/`,
    whose train.log says why); otherwise its files are moved up, so the folder says why it failed;
  - while a run writes, it holds a lock on the folder: a second run into it is refused.
`OwnedFiles` is the list and its rules, shared with `anomalib-lite-predict`'s output folders.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from anomalib_lite.errors import Interrupted, UserInputError, find_user_error, one_line

STAGING = ".incomplete"
RUN_RECORD = ".anomalib_lite_run.json"  # at the top of a run folder: the files the run wrote
STAGING_MARKER = ".anomalib_lite_staging"  # in a staging folder: it is ours to clear
LOCK = ".anomalib_lite.lock"  # held while a run writes into the folder (never removed: see RunDirLock)
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


class OwnedFiles:
    """The files a command wrote into a folder it shares with its user, listed in `folder/record`.

    Only listed files are ever removed (and the folders that removing them leaves empty); a file
    that is not on the list is the user's, whatever its name.
    """

    def __init__(self, folder: Path, record: str) -> None:
        self.folder = folder
        self.record = folder / record

    def read(self) -> list[str] | None:
        """The listed files (relative paths), or None where there is no list."""
        try:
            listed = json.loads(self.record.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        # A list edited to reach outside the folder is not followed there.
        return [name for name in listed if isinstance(name, str) and ".." not in Path(name).parts and not Path(name).is_absolute()]

    def write(self, files: list[str]) -> None:
        temporary = self.record.with_name(self.record.name + ".tmp")
        temporary.write_text(json.dumps({"files": sorted(files)}, indent=0) + "\n")
        os.replace(temporary, self.record)

    def remove_listed(self) -> None:
        """Remove the listed files, then the folders left empty by that (never the top folder)."""
        folders = set()
        top = self.folder.resolve()
        for name in self.read() or []:
            path = self.folder / name
            if not path.parent.resolve().is_relative_to(top):
                continue  # reached through a link out of the folder (a list may come with a shared folder)
            if path.is_file() or path.is_symlink():
                path.unlink()
                folders.update(parent for parent in path.parents if self.folder in parent.parents)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self.record.unlink(missing_ok=True)


def files_under(folder: Path) -> list[str]:
    """Every file under `folder` (links included, not followed), as paths relative to it."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        found += [(base / name).relative_to(folder).as_posix() for name in files]
        found += [(base / name).relative_to(folder).as_posix() for name in dirs if (base / name).is_symlink()]
    return sorted(found)


def _staging_is_ours(staging: Path) -> bool:
    """A staging folder we made: marked, or holding only the .hydra record Hydra writes first."""
    return (staging / STAGING_MARKER).is_file() or {p.name for p in staging.iterdir()} <= {".hydra"}


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """The folder takes a run: writable; new, empty or an earlier run of ours; a finished one only with `overwrite`."""
    check_writable(run_dir, "run dir (hydra.run.dir)")
    if not run_dir.is_dir():
        return
    staging = run_dir / STAGING
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in (STAGING, LOCK))
    if staging.exists() and not (staging.is_dir() and _staging_is_ours(staging)):
        others.insert(0, STAGING)
    if not others:
        return
    if OwnedFiles(run_dir, RUN_RECORD).read() is None:
        raise UserInputError(
            f"{run_dir} is not empty and holds no anomalib-lite run (e.g. {others[0]}): a run writes only into a new "
            "or empty folder, or one of its own earlier runs; choose another hydra.run.dir"
        )
    if (run_dir / "metrics.json").is_file() and not overwrite:
        raise UserInputError(
            f"{run_dir} holds a finished run (metrics.json): pass overwrite=true to replace it once the new run "
            "succeeds, or choose another hydra.run.dir"
        )


def remove_stale_staging(run_dir: Path) -> None:
    """A failed attempt's leftovers: removed before a new attempt stages its files there (only ours)."""
    staging = run_dir / STAGING
    if staging.is_dir() and _staging_is_ours(staging):
        shutil.rmtree(staging)


class RunDirLock:
    """An exclusive lock on a run folder while a run writes into it (`flock` on `<run dir>/.anomalib_lite.lock`).

    The kernel releases it when the process ends, however it ends, so a killed run never leaves
    the folder locked. The lock file stays: removing it would let a third process lock a new file
    while a second still holds the old one. A process holds one lock per folder (taking it again is a no-op).
    """

    _held: dict[Path, int] = {}

    @classmethod
    def acquire(cls, run_dir: Path) -> bool:
        """Take the lock (one line if another process holds it); False where this process held it already."""
        run_dir = run_dir.absolute()
        if run_dir in cls._held:
            return False
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(handle, 32).decode(errors="replace").strip()
            os.close(handle)
            raise UserInputError(
                f"another anomalib-lite run is writing into {run_dir}{f' (process {holder})' if holder else ''}: "
                "wait for it to end, or choose another hydra.run.dir"
            ) from None
        os.ftruncate(handle, 0)
        os.write(handle, str(os.getpid()).encode())
        cls._held[run_dir] = handle
        return True

    @classmethod
    def release(cls, run_dir: Path) -> None:
        handle = cls._held.pop(run_dir.absolute(), None)
        if handle is not None:
            os.close(handle)  # closing the file releases the flock

    @classmethod
    def release_all(cls) -> None:
        for run_dir in list(cls._held):
            cls.release(run_dir)


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
            (self.staging / STAGING_MARKER).touch()
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
            # A user mistake or an interruption is one line; anything else keeps its traceback in train.log.
            logging.getLogger(__name__).error(
                "the run failed: %s", message,
                exc_info=user_error is None and not isinstance(error, (KeyboardInterrupt, Interrupted)),
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

    def commit(self) -> None:
        """The run succeeded (or failed where no finished run was): the earlier run's files go, the
        new ones take their place. A file of the user's at a path the run wrote stays, and the run's
        copy stays in the staging folder (a warning names it)."""
        owned = OwnedFiles(self.run_dir, RUN_RECORD)
        owned.remove_listed()
        (self.staging / STAGING_MARKER).unlink(missing_ok=True)
        moved, kept = [], []
        for name in files_under(self.staging):
            target = self.run_dir / name
            if target.exists() or target.is_symlink():
                kept.append(name)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / name, target)
            moved.append(name)
        owned.write(moved)
        if kept:
            (self.staging / STAGING_MARKER).touch()
            logging.getLogger(__name__).warning(
                "%d files of this run were not moved into %s, where files of yours have their names (e.g. %s): they are "
                "in %s", len(kept), self.run_dir, kept[0], self.staging,
            )
        else:
            _remove_empty_folders(self.staging)  # every file moved: only folders are left, and only empty ones go

    def fail(self) -> None:
        """The run failed: an earlier finished run stays as it was; otherwise the failed run's files move up."""
        if self.has_earlier_run:
            return
        self.commit()


def _remove_empty_folders(top: Path) -> None:
    """`top` and the folders under it, deepest first, each only if it is empty by then."""
    for root, _, _ in sorted(os.walk(top), key=lambda entry: len(Path(entry[0]).parts), reverse=True):
        if not any(Path(root).iterdir()):
            Path(root).rmdir()


def _remove(path: Path) -> None:
    """A file, link or folder, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
