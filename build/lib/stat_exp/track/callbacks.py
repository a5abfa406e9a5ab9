"""Hydra callback that reports a sweep when it ends."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stat_exp.track.report import log_report_to_wandb, print_table, write_report


class SweepReport(Callback):
    """Write report.csv/.md/.png into the sweep directory, print the table and log it to W&B."""

    def __init__(self, metric: str | None = None) -> None:
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Never raises: a broken report must not hide the results the sweep's jobs already wrote."""
        if OmegaConf.select(config, "dry_run"):
            return  # nothing ran
        try:
            sweep_dir = Path(config.hydra.sweep.dir)
            paths = write_report(sweep_dir, self.metric)
            print_table(pd.read_csv(paths["csv"]))
            log_report_to_wandb(sweep_dir, paths, OmegaConf.select(config, "logger"))
        except Exception as e:  # noqa: BLE001 - reported in one line, by design
            print(f"sweep report failed: {type(e).__name__}: {e}", file=sys.stderr)
