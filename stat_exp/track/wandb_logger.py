"""logger=wandb: one W&B run per job, offline by default with every wandb file inside the run directory.

Online, the user's own W&B settings (host and entity from `wandb login`, WANDB_* variables) are left
as they are; offline, wandb's cache, data, config and artifact folders point into the run.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from stat_exp.track.logger import RunLogger, metric_tables, run_tags, structure_rows, sweep_group

# wandb writes to ~/.cache, ~/.local/share and ~/.config unless these point elsewhere.
_WANDB_DIRS = {
    "WANDB_CACHE_DIR": "cache",
    "WANDB_DATA_DIR": "data",
    "WANDB_CONFIG_DIR": "config",
    "WANDB_ARTIFACT_DIR": "artifacts",
}
# What the user had before any run of this process redirected them.
_USER_DIRS = {var: os.environ.get(var) for var in _WANDB_DIRS}


class WandbLogger(RunLogger):
    """A W&B run; several may follow each other in one process, as the jobs of a local sweep do."""

    def __init__(
        self,
        run_dir: str | Path,
        run_config: Mapping[str, Any],
        sweep_dir: str | Path | None = None,
        name: str | None = None,
        job_type: str | None = None,
        project: str = "stat-exp",
        entity: str | None = None,
        mode: Literal["offline", "online", "disabled"] = "offline",
        group: str | None = None,
        tags: Sequence[str] = (),
    ) -> None:
        """`group`: None puts the jobs of one sweep in a group named after the sweep. `tags` come on top
        of the automatic ones (model, pruner, backend, budget, evaluators)."""
        import wandb

        super().__init__(run_dir, run_config, sweep_dir, name, job_type)
        wandb_env(self.run_dir / "wandb", mode)
        self._wandb = wandb
        self._run = wandb.init(
            project=project,
            entity=entity,
            dir=self.run_dir,
            mode=mode,
            group=group or (sweep_group(self.sweep_dir) if self.sweep_dir is not None else None),
            tags=list(dict.fromkeys([*run_tags(run_config), *tags])),
            name=name,
            job_type=job_type,
            config=dict(run_config),
            reinit="finish_previous",
        )

    @property
    def location(self) -> str | None:
        """The run's page online; offline, its folder and the command that uploads it."""
        if self._run is None or self._run.disabled:
            return None
        if self._run.settings.mode == "online":
            return self._run.url
        folder = Path(self._run.dir).parent
        return f"{folder} (offline: `wandb sync {folder}` uploads it)"

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics))
        for evaluator, rows in metric_tables(metrics).items():
            self.log_table(f"{evaluator}/results", rows)

    def log_structure(self, structure: Mapping[str, Sequence[int]]) -> None:
        columns = ["layer", "heads", "kv_heads", "neurons"]
        self._run.log({"structure": self._wandb.Table(columns=columns, data=structure_rows(structure))})

    def log_table(self, name: str, data: Any) -> None:
        """Log a pandas DataFrame, or a list of dict rows, as a wandb.Table."""
        import pandas as pd

        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data))
        self._run.log({name: self._wandb.Table(dataframe=frame)})

    def log_image(self, name: str, path: Path) -> None:
        self._run.log({name: self._wandb.Image(str(path))})

    def log_file(self, path: Path) -> None:
        path = Path(path)
        self._run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, status: str, error: str | None = None) -> None:
        """Close the run with exit code 0 for "ok", 1 otherwise, the error in its summary; a second
        call does nothing."""
        run, self._run = self._run, None
        if run is None:
            return
        run.summary["status"] = status
        if error:
            run.summary["error"] = error
        run.finish(exit_code=0 if status == "ok" else 1)


def wandb_env(wandb_dir: Path, mode: str) -> None:
    """Offline or disabled: wandb's folders inside the run. Online: the user's own folders (their
    settings file holds the host and entity `wandb login` chose). Quiet either way."""
    for var, sub in _WANDB_DIRS.items():
        if mode != "online":
            os.environ[var] = str((wandb_dir / sub).resolve())
        elif _USER_DIRS[var] is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = _USER_DIRS[var]
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    os.environ.setdefault("WANDB_DISABLE_CODE", "true")
