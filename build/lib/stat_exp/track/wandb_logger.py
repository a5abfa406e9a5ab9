"""One W&B run per job, offline by default, with every wandb file kept inside the run directory."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

LOGGERS = ("wandb", "none")
# wandb writes to ~/.cache, ~/.local/share and ~/.config unless these point elsewhere.
_WANDB_DIRS = {
    "WANDB_CACHE_DIR": "cache",
    "WANDB_DATA_DIR": "data",
    "WANDB_CONFIG_DIR": "config",
    "WANDB_ARTIFACT_DIR": "artifacts",
}


class RunLogger:
    """What a job may log; this base logs nothing, so logger=none costs nothing."""

    def log_config(self, cfg: dict) -> None:
        pass

    def log_metrics(self, metrics: dict) -> None:
        pass

    def log_structure(self, structure: dict) -> None:
        pass

    def log_table(self, name: str, data: Any) -> None:
        pass

    def log_image(self, name: str, path: Path) -> None:
        pass

    def finish(self, status: str) -> None:
        pass

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("failed" if exc_type else "ok")


class NullLogger(RunLogger):
    """logger=none."""


def structure_rows(structure: Mapping[str, Sequence[int]]) -> list[list[Any]]:
    """Per-layer rows [layer, heads, kv_heads, neurons]; a quantity the model lacks is None."""
    columns = [structure.get(k) or [] for k in ("heads", "kv_heads", "neurons")]
    n_layers = max((len(c) for c in columns), default=0)
    return [[i, *(c[i] if i < len(c) else None for c in columns)] for i in range(n_layers)]


class WandbLogger(RunLogger):
    """A W&B run; several may follow each other in one process, as the jobs of a local sweep do."""

    def __init__(
        self,
        project: str,
        run_dir: Path,
        config: dict,
        group: str | None = None,
        tags: Sequence[str] = (),
        mode: str = "offline",
        name: str | None = None,
        job_type: str | None = None,
    ) -> None:
        import wandb

        run_dir = Path(run_dir)
        _keep_wandb_files_in(run_dir / "wandb")
        self._wandb = wandb
        self._run = wandb.init(
            project=project,
            dir=run_dir,
            mode=mode,
            group=group,
            tags=list(tags),
            name=name,
            job_type=job_type,
            config=config,
            reinit="finish_previous",
        )

    def log_config(self, cfg: dict) -> None:
        self._run.config.update(cfg, allow_val_change=True)

    def log_metrics(self, metrics: dict) -> None:
        self._run.log(dict(metrics))

    def log_structure(self, structure: dict) -> None:
        columns = ["layer", "heads", "kv_heads", "neurons"]
        self._run.log({"structure": self._wandb.Table(columns=columns, data=structure_rows(structure))})

    def log_table(self, name: str, data: Any) -> None:
        """Log a pandas DataFrame, or a list of dict rows, as a wandb.Table."""
        import pandas as pd

        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data))
        self._run.log({name: self._wandb.Table(dataframe=frame)})

    def log_image(self, name: str, path: Path) -> None:
        self._run.log({name: self._wandb.Image(str(path))})

    def finish(self, status: str) -> None:
        """Close the run with exit code 0 for "ok", 1 otherwise; a second call does nothing."""
        run, self._run = self._run, None
        if run is None:
            return
        run.summary["status"] = status
        run.finish(exit_code=0 if status == "ok" else 1)


def _keep_wandb_files_in(wandb_dir: Path) -> None:
    """Point wandb's cache, data, config and artifact folders inside the run, and quiet it."""
    for var, sub in _WANDB_DIRS.items():
        os.environ[var] = str((wandb_dir / sub).resolve())
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    os.environ.setdefault("WANDB_DISABLE_CODE", "true")


def sweep_group(sweep_dir: Path) -> str:
    """A readable W&B group for a sweep from its last two path parts, e.g. multirun-2026-11-25_04-30-00."""
    return "-".join(Path(sweep_dir).parts[-2:])


def to_plain(cfg: Mapping | DictConfig | None) -> dict:
    """A logger config as a plain dict, whether it came from Hydra or from Python."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg or {})


def make_logger(
    logger_cfg: Mapping | DictConfig | None,
    run_dir: Path,
    config: dict,
    sweep_dir: Path | None = None,
    job_name: str | None = None,
    job_type: str | None = None,
) -> RunLogger:
    """Build the logger a config names; the jobs of one sweep share a W&B group named after it."""
    cfg = to_plain(logger_cfg)
    name = cfg.get("name", "none")
    if name not in LOGGERS:
        raise ValueError(f"unknown logger {name!r}; valid: {', '.join(LOGGERS)}")
    if name == "none":
        return NullLogger()
    group = cfg.get("group") or (sweep_group(sweep_dir) if sweep_dir is not None else None)
    return WandbLogger(
        project=cfg.get("project", "stat-exp"),
        run_dir=run_dir,
        config=config,
        group=group,
        tags=cfg.get("tags") or (),
        mode=cfg.get("mode", "offline"),
        name=job_name,
        job_type=job_type or cfg.get("job_type"),
    )
