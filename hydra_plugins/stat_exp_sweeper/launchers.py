"""The launchers stat_exp's configs select (stat_exp/conf/hydra/launcher/*.yaml name them as `_target_`):
Hydra's basic, joblib and submitit launchers, with each job in a process of its own and every launched
batch written to the sweep's manifest (stat_exp.track.sweep) after the jobs' folders are freed of
earlier outputs (stat_exp.track.run_dir).

A job killed by a signal or out of memory then takes only its own process: it is recorded failed, the
other jobs finish, and the sweep ends with its report. (In one process, basic's jobs die with the
sweep; joblib's loky pool kills every worker when one dies; submitit raises for the whole sweep.)"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra_plugins.hydra_joblib_launcher._core import execute_job
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (BaseSubmititLauncher, LocalLauncher,
                                                                     SlurmLauncher)
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


def prepare_batch(launcher: Launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> None:
    """Free each job's folder (earlier outputs moved aside, a resumed job that is done kept) and add
    the batch to the sweep's manifest, with each job's config hash, before any job starts."""
    from stat_exp.config.run_folder import job_hash
    from stat_exp.track.run_dir import free_job_dir
    from stat_exp.track.sweep import ManifestJob, add_to_manifest

    config, loader = launcher.config, launcher.hydra_context.config_loader
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    resume = bool(OmegaConf.select(config, "resume"))
    launching = HydraConfig.instance().cfg
    jobs = []
    try:
        for num, overrides in enumerate(job_overrides, start=initial_job_idx):
            cfg = loader.load_sweep_config(config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.num = num
            HydraConfig.instance().set_config(cfg)  # the job's ${hydra:...} values
            digest, subdir = job_hash(cfg), str(cfg.hydra.sweep.subdir)
            free_job_dir(sweep_dir / subdir, resume, digest)
            jobs.append(ManifestJob(num, subdir, list(overrides), digest, cfg.hydra.runtime.choices.get("pruner"),
                                    OmegaConf.select(cfg, "model.name", default=None)))
    finally:
        HydraConfig.instance().cfg = launching
    add_to_manifest(sweep_dir, jobs)


def run_isolated(sweep_dir: Path, num: int, overrides: Sequence[str], job: Any, *args: Any) -> JobReturn:
    """`job(*args)` (which runs Hydra job `num`) in a new process; if that process dies, the job's
    record says failed and why, and the sweep gets a job that returned None, as a failed job does."""
    from joblib.externals.loky import ProcessPoolExecutor
    from joblib.externals.loky.process_executor import TerminatedWorkerError

    with ProcessPoolExecutor(max_workers=1) as pool:
        try:
            return pool.submit(_job_here, job, *args).result()
        except TerminatedWorkerError as e:
            codes = re.search(r"exit codes of the workers are \{(.*?)\}", str(e))
            reason = (f"killed: its process ended with {codes.group(1) if codes else 'a signal'} "
                      "(a signal, or the system out of memory)")
    log.error("job #%d %s", num, reason)
    record_killed(sweep_dir, num, reason)
    return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=None)


def record_killed(sweep_dir: Path, num: int, reason: str) -> None:
    """Mark job `num`'s results.json (still "running": the job died mid-way) failed with the reason."""
    from stat_exp.track.results import RunRecord
    from stat_exp.track.sweep import manifest_jobs

    for job in manifest_jobs(sweep_dir) or []:
        record = RunRecord.read(Path(sweep_dir) / job.dir) if job.num == num else None
        if record is not None and record.status == "running":
            record.status, record.error = "failed", reason
            record.write(Path(sweep_dir) / job.dir)


def _job_here(job: Any, *args: Any) -> JobReturn:
    """In the job's own process: set up as `python -m stat_exp.run` does (its resolvers, its warning
    filters), then run the job."""
    import stat_exp.run  # noqa: F401

    return job(*args)


def launch_local(launcher: Launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
                 n_jobs: int) -> list[JobReturn]:
    """Hydra's local launch (logging, sweep folder, one line per job), n_jobs at a time, each job isolated."""
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    prepare_batch(launcher, job_overrides, initial_job_idx)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    log.info("Launching %d jobs locally, %d at a time, each in its own process", len(job_overrides), n_jobs)
    state = Singleton.get_state()

    def one(num: int, overrides: Sequence[str]) -> JobReturn:
        log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        return run_isolated(sweep_dir, num, overrides, execute_job, num, overrides, launcher.hydra_context,
                            launcher.config, launcher.task_function, state)

    with ThreadPoolExecutor(max_workers=n_jobs) as threads:
        return list(threads.map(one, *zip(*enumerate(job_overrides, start=initial_job_idx))))


class BasicProcessLauncher(BasicLauncher):
    """`hydra/launcher=basic`: one job after the other, each in its own process."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return launch_local(self, job_overrides, initial_job_idx, n_jobs=1)


class JoblibProcessLauncher(JoblibLauncher):
    """`hydra/launcher=joblib`: `n_jobs` jobs at a time (joblib's meaning of negative values), each in
    its own process, so a killed one does not break a shared worker pool."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from joblib import effective_n_jobs

        n_jobs = min(effective_n_jobs(self.joblib.get("n_jobs") or 1), len(job_overrides))
        return launch_local(self, job_overrides, initial_job_idx, n_jobs=max(n_jobs, 1))


def _submitit_job(launcher: BaseSubmititLauncher, *args: Any) -> JobReturn:
    return BaseSubmititLauncher.__call__(launcher, *args)


class _ProcessPerJob(BaseSubmititLauncher):
    """Submitit runs the launcher itself in each job's process; the job runs in a child of it, so
    the submitit process outlives a killed job and returns its failure (no UncompletedJobError)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        prepare_batch(self, job_overrides, initial_job_idx)
        return super().launch(job_overrides, initial_job_idx)

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict) -> JobReturn:
        return run_isolated(Path(str(self.config.hydra.sweep.dir)), job_num, sweep_overrides, _submitit_job,
                            self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state)


class SubmititLocalProcessLauncher(_ProcessPerJob, LocalLauncher):
    """`hydra/launcher=submitit_local`."""


class SubmititSlurmProcessLauncher(_ProcessPerJob, SlurmLauncher):
    """`hydra/launcher=submitit_slurm`."""
