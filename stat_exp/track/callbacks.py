"""Hydra callback that reports a sweep when it ends, in the process that launched it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stat_exp.track.report import SweepOutcome, log_report, outcome, print_table, write_report


class SweepReport(Callback):
    """Write report.csv/.md/.png into the sweep directory, print the table, log it, and keep the
    sweep's outcome for the command line's exit code (`SweepReport.last`)."""

    last: ClassVar[SweepOutcome | None] = None

    def __init__(self, metric: str | None = None) -> None:
        self.metric = metric

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepReport.last = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Never raises: a broken report must not hide the results the sweep's jobs already wrote."""
        if OmegaConf.select(config, "dry_run"):
            return  # nothing ran
        sweep_dir = Path(config.hydra.sweep.dir)
        SweepReport.last = outcome(sweep_dir)
        try:
            paths = write_report(sweep_dir, self.metric)
            print_table(pd.read_csv(paths["csv"]))
            log_report(sweep_dir, paths, OmegaConf.to_container(config.logger, resolve=True)
                       if OmegaConf.select(config, "logger") is not None else None)
        except Exception as e:  # noqa: BLE001 - reported in one line, by design
            print(f"sweep report failed: {type(e).__name__}: {e}", file=sys.stderr)
