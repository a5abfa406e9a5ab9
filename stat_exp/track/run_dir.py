"""A run folder holds one run's outputs, never two runs' side by side.

A sweep's job folder belongs to the sweep (whose lock it holds), so earlier outputs there are moved
aside whole into `previous-<time>/` before the job starts. A single run's folder can be any folder the
user named (even `.`), so a run into one that holds an earlier run's results.json is refused instead.
`resume=true` keeps a folder whose run is ok for the same config: the job then returns that record."""
from __future__ import annotations

import time
from pathlib import Path

from stat_exp.errors import UserError
from stat_exp.track.results import RESULTS_FILE, RunRecord

PREVIOUS = "previous-"


class RunFolderInUse(UserError):
    """A single run's folder already holds an earlier run."""


def is_done(run_dir: Path, digest: str | None) -> bool:
    """Whether run_dir holds an ok run of the config with hash `digest` (what resume skips)."""
    record = RunRecord.read(run_dir)
    return digest is not None and record is not None and record.status == "ok" and record.config_hash == digest


def move_aside(run_dir: Path) -> Path | None:
    """Move everything in run_dir (but earlier `previous-*` folders) into a new `previous-<time>/`."""
    run_dir = Path(run_dir)
    entries = [p for p in run_dir.iterdir() if not p.name.startswith(PREVIOUS)] if run_dir.is_dir() else []
    if not entries:
        return None
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    while (target := run_dir / f"{PREVIOUS}{stamp}{f'-{n}' if n else ''}").exists():
        n += 1
    target.mkdir()
    for entry in entries:
        entry.rename(target / entry.name)
    return target


def free_job_dir(job_dir: Path, resume: bool, digest: str | None) -> None:
    """Before a sweep's job starts: move earlier outputs aside, unless resume finds the job done."""
    if not (resume and is_done(job_dir, digest)):
        move_aside(job_dir)


def check_run_dir(run_dir: Path, resume: bool, digest: str | None) -> None:
    """RunFolderInUse when a single run's folder holds an earlier run (that resume would not reuse)."""
    if (Path(run_dir) / RESULTS_FILE).exists() and not (resume and is_done(run_dir, digest)):
        raise RunFolderInUse(f"run folder {run_dir} already holds a run (its {RESULTS_FILE}); choose another "
                             "hydra.run.dir or move that run away (resume=true reuses it when it is ok "
                             "for the same config)")
