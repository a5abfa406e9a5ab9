"""The Hydra entry point: `python -m stat_exp.run ...` or `stat-exp ...`.

Turns a composed config into a pipeline call. Bad input (an unknown name, a value its typed
definition does not allow, a missing file) ends with one line and exit code 2, before weights load;
every other failure ends in one line too (stat_exp.exits), never a traceback.
In a sweep a failed job is recorded as failed and the others go on; the process that launched the
sweep then reads every job's results.json (whichever launcher ran them), lists the failed ones and
exits 1. A job returns its main metric, so sweepers that search (optuna) can use it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from stat_exp.config.cli import CONF_DIR, CONFIG_NAME, check_overrides, command_line
from stat_exp.config.resolvers import register_resolvers
from stat_exp.dry_run import describe
from stat_exp.errors import first_line, one_line
from stat_exp.exits import exit_cleanly, log_failure, user_error
from stat_exp.pipeline import run_pipeline
from stat_exp.track.callbacks import SweepReport
from stat_exp.track.report import main_metric
from stat_exp.track.summary import run_summary

register_resolvers()
_failures: list[Exception] = []  # the failure of a single run, ended in one line by stat_exp.exits


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=CONFIG_NAME)
def _job(cfg: DictConfig) -> float | None:
    """One job. Returns its main metric (`objective`, else the first perplexity, else the first
    metric), or None when it failed."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    try:
        if cfg.get("dry_run"):
            print(describe(cfg, run_dir, hc.runtime.choices), flush=True)
            return None
        record = run_pipeline(cfg, run_dir, Path(hc.sweep.dir) if multirun else None)
        print(run_summary(record.to_dict(), run_dir, run_dir / "model" if cfg.save_model else None), flush=True)
    except Exception as e:  # noqa: BLE001 - every failure of a job is recorded and reported in one line
        log_failure(e)
        if not multirun:  # raised again outside Hydra, which would print a line of its own
            _failures.append(e)
            return None
        user = user_error(e)
        message = first_line(user) if user else f"{one_line(e)} (see {run_dir}/results.json)"
        print(f"error: {message}", file=sys.stderr)
        return None
    objective = cfg.get("objective")
    metric = main_metric(list(record.metrics), objective)
    if metric is None and objective is not None:
        print(f"error: objective={objective!r} is not among this job's metrics: {', '.join(record.metrics)}",
              file=sys.stderr)
    return record.metrics[metric] if metric else None


def main() -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing a traceback: exits says it in one line
    exit_cleanly(_main)


def _main() -> None:
    argv = sys.argv[1:]
    check_overrides(argv)
    sys.argv[1:] = command_line(argv)
    _job()
    if _failures:
        raise _failures.pop()
    outcome = SweepReport.last
    if outcome is not None and outcome.earlier:
        print(f"not part of this sweep (job folders of earlier sweeps): {', '.join(outcome.earlier)}",
              file=sys.stderr)
    if outcome is not None and outcome.failed:
        print(f"{len(outcome.failed)} of {outcome.jobs} job(s) failed:", file=sys.stderr)
        for run_dir, error in outcome.failed:
            print(f"  {run_dir}: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
