"""What became of every job of a sweep: finished, failed (and why), or never run.

A sweep's folder holds Hydra's `multirun.yaml` (the sweep's overrides) and one folder per job that
started (its `.hydra/overrides.yaml` names the job). A job folder without metrics.json failed (its
train.log's "the run failed:" line says why) or was stopped; a job of the sweep's expansion
without a folder never ran. The expansion is known for Hydra's basic sweeper (grids of comma
lists); other sweepers (Optuna) choose their jobs as they go, so only what ran is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from anomalib_lite.run_dir import STAGING

FAILURE_PREFIX = "the run failed: "  # run_dir.StagedRun's line in train.log


@dataclass
class SweepStatus:
    finished: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (job folder, why)
    missing: list[str] = field(default_factory=list)  # the overrides of jobs that never started

    def summary_lines(self) -> list[str]:
        total = len(self.finished) + len(self.failed) + len(self.missing)
        lines = [f"{len(self.finished)} of {total} jobs finished"]
        lines += [f"failed: {folder} ({why})" for folder, why in self.failed]
        lines += [f"never ran: {overrides}" for overrides in self.missing]
        return lines


def _job_overrides(job_dir: Path) -> list[str] | None:
    for record in (job_dir / ".hydra" / "overrides.yaml", job_dir / STAGING / ".hydra" / "overrides.yaml"):
        if record.is_file():
            try:
                return [str(item) for item in yaml.safe_load(record.read_text()) or []]
            except yaml.YAMLError:
                return None
    return None


def _failure_reason(job_dir: Path) -> str:
    for log in (job_dir / STAGING / "train.log", job_dir / "train.log"):
        if log.is_file():
            reasons = [line.split(FAILURE_PREFIX, 1)[1] for line in log.read_text(errors="replace").splitlines() if FAILURE_PREFIX in line]
            if reasons:
                return reasons[-1]
    return "stopped before it finished (no failure recorded: killed?)"


def expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Every job's overrides from the sweep's multirun.yaml (basic sweeper only), else None."""
    record = sweep_dir / "multirun.yaml"
    if not record.is_file():
        return None
    try:
        config = yaml.safe_load(record.read_text()) or {}
        hydra = config["hydra"]
        if not str(hydra.get("sweeper", {}).get("_target_", "")).endswith("BasicSweeper"):
            return None
        # Hydra's own expansion (it has no public one): the jobs are exactly the ones it launched.
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides(list(hydra["overrides"]["task"]))
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # noqa: BLE001 - an unreadable record: report what ran, without the expansion
        return None


def sweep_status(sweep_dir: Path) -> SweepStatus:
    status = SweepStatus()
    seen: list[frozenset[str]] = []
    for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()) if sweep_dir.is_dir() else []:
        overrides = _job_overrides(job_dir)
        if overrides is None:
            continue  # not a job's folder
        seen.append(frozenset(overrides))
        if (job_dir / "metrics.json").is_file():
            status.finished.append(job_dir)
        else:
            status.failed.append((job_dir, _failure_reason(job_dir)))
    for job in expected_jobs(sweep_dir) or []:
        if frozenset(job) not in seen:
            status.missing.append(" ".join(job))
    return status
