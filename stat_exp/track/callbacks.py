"""Hydra callback of the launching process: a sweep folder held by one sweep, reported when it ends."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stat_exp.errors import UserError, one_line
from stat_exp.track.report import SweepOutcome, log_report, outcome, print_table, write_report
from stat_exp.track.sweep import lock_sweep_dir, start_manifest, unlock_sweep_dir


class SweepReport(Callback):
    """Lock the sweep folder and start its manifest when the sweep starts; when it ends, write
    report.csv/.md/.png into it, print the table, log it, keep the sweep's outcome for the command
    line's exit code (`SweepReport.last`) and release the lock."""

    last: ClassVar[SweepOutcome | None] = None

    def __init__(self, metric: str | None = None) -> None:
        self.metric = metric

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepReport.last = None
        if OmegaConf.select(config, "dry_run"):
            return  # nothing will run or be written
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            lock_sweep_dir(sweep_dir)
        except UserError as e:  # before Hydra writes anything: one line, exit 2
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        start_manifest(sweep_dir, bool(OmegaConf.select(config, "resume")))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Never raises: a broken report must not hide the results the sweep's jobs already wrote."""
        if OmegaConf.select(config, "dry_run"):
            return  # nothing ran
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            SweepReport.last = outcome(sweep_dir)
            paths = write_report(sweep_dir, self.metric)
            print_table(pd.read_csv(paths["csv"]))
            log_report(sweep_dir, paths, OmegaConf.to_container(config.logger, resolve=True)
                       if OmegaConf.select(config, "logger") is not None else None)
        except Exception as e:  # noqa: BLE001 - reported in one line, by design
            print(f"sweep report failed: {one_line(e)}", file=sys.stderr)
            if SweepReport.last is None:  # not even the outcome: the sweep cannot be called a success
                SweepReport.last = SweepOutcome(jobs=0, failed=[(str(sweep_dir), f"no outcome: {one_line(e)}")])
        finally:
            unlock_sweep_dir(sweep_dir)
