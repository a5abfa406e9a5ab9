"""One sweep per sweep folder: a lock held for the sweep's whole life, and a manifest of the jobs it
launched, so its report, failed list and exit code cover exactly those jobs (never an earlier
sweep's jobs left in the same folder)."""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from stat_exp.errors import UserError
from stat_exp.track.results import RESULTS_FILE, write_json_atomic

LOCK_FILE = ".sweep.lock"
HOLDER_FILE = ".sweep.holder"  # who holds the lock (the lock file itself is truncated by each try)
MANIFEST_FILE = "manifest.json"
KILLED = "stopped before it finished (killed or crashed): results.json still says running"
MISSING = "no results.json: the job ended before it began"

_held: dict[Path, FileLock] = {}  # module level: a callback object travels to job processes, a lock must not


class SweepFolderBusy(UserError):
    """Another sweep holds the lock on this sweep folder."""


def lock_sweep_dir(sweep_dir: Path) -> None:
    """Take the sweep folder's lock for this process (released by `unlock_sweep_dir` or at exit);
    SweepFolderBusy naming the folder and the holder if another sweep has it."""
    sweep_dir = Path(sweep_dir).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(sweep_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = (sweep_dir / HOLDER_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            holder = "unknown holder"
        raise SweepFolderBusy(f"sweep folder {sweep_dir} is in use by another sweep ({holder}); "
                              "wait for it to end or choose another hydra.sweep.dir") from None
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    (sweep_dir / HOLDER_FILE).write_text(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n",
                                         encoding="utf-8")
    _held[sweep_dir] = lock


def unlock_sweep_dir(sweep_dir: Path) -> None:
    lock = _held.pop(Path(sweep_dir).resolve(), None)
    if lock is not None:
        lock.release()


@dataclass(frozen=True)
class ManifestJob:
    """One launched job: its number, its folder relative to the sweep folder, its overrides, the hash
    of its checked config (None when the config does not check: the job then fails with the reason)."""

    num: int
    dir: str
    overrides: list[str]
    config_hash: str | None
    pruner: str | None = None
    model: str | None = None


def start_manifest(sweep_dir: Path, resume: bool) -> None:
    """A new, empty manifest: what an earlier sweep launched here is no longer this sweep's."""
    write_json_atomic(Path(sweep_dir) / MANIFEST_FILE, {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                        "resume": resume, "jobs": []})


def add_to_manifest(sweep_dir: Path, jobs: list[ManifestJob]) -> None:
    """Add a launched batch (a searching sweeper launches several, one after the other)."""
    path = Path(sweep_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a launch without the sweep's callback (Python callers)
        manifest = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resume": False, "jobs": []}
    manifest["jobs"] += [vars(job) for job in jobs]
    write_json_atomic(path, manifest)


def manifest_jobs(sweep_dir: Path) -> list[ManifestJob] | None:
    """The jobs of the last sweep launched here; None when there is no manifest (an older sweep) or
    it lists no job (a launcher that does not write it)."""
    try:
        data = json.loads((Path(sweep_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))
        jobs = [ManifestJob(**job) for job in data["jobs"]]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return jobs or None


def job_folders(sweep_dir: Path) -> list[str]:
    """Every job folder in sweep_dir (one holding results.json or Hydra's .hydra; "." when sweep_dir
    is a run's own folder), relative to it, leaving out folders inside a job folder (W&B's copies,
    runs moved aside into previous-*)."""
    sweep_dir = Path(sweep_dir)
    marked = {p.parent for name in (RESULTS_FILE, ".hydra") for p in sweep_dir.rglob(name)}
    outer = [d for d in marked if not any(parent in marked for parent in d.parents)]
    return sorted(str(d.relative_to(sweep_dir)) for d in outer)


@dataclass(frozen=True)
class SweepJobs:
    """The job folders a report covers, and those left by earlier sweeps (listed apart)."""

    current: list[str]
    earlier: list[str] = field(default_factory=list)
    names: dict[str, dict[str, str | None]] = field(default_factory=dict)  # pruner/model of each job


def sweep_jobs(sweep_dir: Path) -> SweepJobs:
    """This sweep's jobs from its manifest; without one, every job folder in sweep_dir."""
    folders = job_folders(sweep_dir)
    launched = manifest_jobs(sweep_dir)
    if launched is None:
        return SweepJobs(current=folders)
    current = list(dict.fromkeys(job.dir for job in launched))
    names = {job.dir: {"pruner": job.pruner, "model": job.model} for job in launched}
    inside = [Path(d) for d in current]
    earlier = [d for d in folders if not any(Path(d) == c or c in Path(d).parents for c in inside)]
    return SweepJobs(current=current, earlier=earlier, names=names)
