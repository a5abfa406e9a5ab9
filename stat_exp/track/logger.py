"""The logger interface. A logger is a `_target_` config (conf/logger/*.yaml) like any other group, so a
CSV, W&B or MLflow logger plugs in the same way; the pipeline passes the run's directory, its config,
the sweep directory, a run name and a job type, and the config file adds the logger's own options.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class RunLogger:
    """What a job may log; this base logs nothing, so logger=none costs nothing."""

    def __init__(self, run_dir: str | Path, run_config: Mapping[str, Any], sweep_dir: str | Path | None = None,
                 name: str | None = None, job_type: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_config = run_config
        self.sweep_dir = Path(sweep_dir) if sweep_dir is not None else None
        self.name, self.job_type = name, job_type

    @property
    def location(self) -> str | None:
        """Where a person finds this run's logged record (a link or a folder), for the run's summary."""
        return None

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        pass

    def log_structure(self, structure: Mapping[str, Sequence[int]]) -> None:
        pass

    def log_table(self, name: str, data: Any) -> None:
        pass

    def log_image(self, name: str, path: Path) -> None:
        pass

    def log_file(self, path: Path) -> None:
        """Attach a file (the run's results.json) to the run."""

    def finish(self, status: str, error: str | None = None) -> None:
        pass

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("failed" if exc_type else "ok", f"{exc_type.__name__}: {exc}" if exc_type else None)


class NullLogger(RunLogger):
    """logger=none."""


def make_logger(node: Mapping[str, Any], run_dir: str | Path, run_config: Mapping[str, Any],
                sweep_dir: str | Path | None = None, name: str | None = None, job_type: str | None = None) -> RunLogger:
    """The logger a `_target_` config names, given the run it logs. Not recursive: `run_config` holds
    other groups' `_target_` nodes, which are data here, not things to build."""
    from hydra.utils import instantiate

    return instantiate(node, run_dir=run_dir, run_config=run_config, sweep_dir=sweep_dir, name=name,
                       job_type=job_type, _recursive_=False, _convert_="all")


def run_name(model: str, pruner: str, flops: float) -> str:
    """What ran, readable in a list of runs: "smollm2_135m stat (no correction) @0.7"."""
    return f"{model} {pruner} @{flops:g}"


def run_tags(config: Mapping[str, Any]) -> list[str]:
    """Tags that let runs be filtered by what ran: model, pruner and backend classes, budget, evaluators."""
    def target(group: str) -> str | None:
        node = config.get(group)
        return str(node["_target_"]).rsplit(".", 1)[-1] if isinstance(node, Mapping) and "_target_" in node else None

    budget = config.get("budget") or {}
    tags = [(config.get("model") or {}).get("name"), target("pruner"), target("factorization"),
            f"flops={budget['flops']:g}" if "flops" in budget else None, *(config.get("eval") or {})]
    return [str(t) for t in tags if t]


def sweep_group(sweep_dir: Path) -> str:
    """A readable group for a sweep from its last two path parts, e.g. multirun-2026-11-25_04-30-00."""
    return "-".join(Path(sweep_dir).parts[-2:])


def structure_rows(structure: Mapping[str, Sequence[int]]) -> list[list[Any]]:
    """Per-layer rows [layer, heads, kv_heads, neurons]; a quantity the model lacks is None."""
    columns = [structure.get(k) or [] for k in ("heads", "kv_heads", "neurons")]
    n_layers = max((len(c) for c in columns), default=0)
    return [[i, *(c[i] if i < len(c) else None for c in columns)] for i in range(n_layers)]


def metric_tables(metrics: Mapping[str, float]) -> dict[str, list[dict[str, Any]]]:
    """Per-task metrics ("lm_eval/<task>/<metric>", "glue/<task>/<metric>") as one table per evaluator,
    rows {task, metric, value, stderr}: the results table lm-eval prints, for a logger to keep."""
    tables: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) < 3:
            continue
        evaluator, task, metric = parts[0], parts[1], "/".join(parts[2:])
        base = metric.replace("_stderr", "")
        row = tables.setdefault(evaluator, {}).setdefault((task, base), {"task": task, "metric": base,
                                                                          "value": None, "stderr": None})
        row["stderr" if "_stderr" in metric else "value"] = value
    return {evaluator: list(rows.values()) for evaluator, rows in tables.items()}
