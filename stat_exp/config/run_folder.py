"""A single run's folder checked before Hydra writes into it (stat_exp.track.run_dir), and the
config hash a job will record, which that check and the launchers' resume need before the job runs."""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from stat_exp.config.validate import checked_config
from stat_exp.errors import UserError
from stat_exp.track.results import config_hash
from stat_exp.track.run_dir import check_run_dir


def job_hash(cfg: DictConfig) -> str | None:
    """The config hash the job of a composed config (hydra node included) records; None when its
    config does not check (the job then fails, saying why)."""
    task = copy.deepcopy(cfg)
    with open_dict(task):
        task.pop("hydra", None)
    try:
        return config_hash(checked_config(task))
    except Exception:  # noqa: BLE001 - the job reports it, in its own record
        return None


class RunFolder(Callback):
    """A single run into a folder that holds an earlier run: one line and exit 2, before Hydra writes
    its .hydra/ and log there."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "dry_run"):
            return
        resume = bool(OmegaConf.select(config, "resume"))
        if resume:
            HydraConfig.instance().set_config(config)  # the job's hash resolves ${hydra:...}
        try:
            check_run_dir(Path(config.hydra.run.dir), resume, job_hash(config) if resume else None)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
