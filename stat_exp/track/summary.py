"""What a person sees when a run ends, and when a long one starts: a few lines on stdout.

The record on disk (results.json) stays the contract; these lines only say what it holds, so a user
need not open it to learn what was kept, how well it does, how long it took and where things are.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stat_exp.track.results import RESULTS_FILE

# Predicted seconds from which a job says at its start what the planner expects.
LONG_JOB_S = 60.0
PHASES = ("load", "calibrate", "prune", "eval", "total")


def _seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    minutes, seconds = divmod(round(s), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _mb(mb: float) -> str:
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _number(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fractions(values: Mapping[str, float]) -> str:
    names = {"flops_fraction": "FLOPs", "params_fraction": "parameters"}
    return ", ".join(f"{values[k]:.3f} of the {name}" for k, name in names.items() if k in values)


def run_summary(record: Mapping[str, Any], run_dir: Path, model_dir: Path | None = None) -> str:
    """The lines a finished run prints: model and pruner, target and achieved fractions, metrics,
    time per phase, peak memory, where results.json, the saved model and the tracker's run are."""
    pruner = record["pruner"] + (f" ({record['variant']})" if record.get("variant") else "")
    target = (record.get("target") or {}).get("flops_fraction")
    head = f"{record['model']} pruned by {pruner}"
    if target is not None and target < 1:
        head += f" to {target:g} of the FLOPs"
    lines = [head]
    achieved = _fractions(record.get("achieved") or {})
    if achieved:
        lines.append(f"  kept:     {achieved}")
    metrics = record.get("metrics") or {}
    if metrics:
        lines.append("  metrics:  " + ", ".join(f"{k} {_number(v)}" for k, v in metrics.items()))
    timing = record.get("timing_s") or {}
    if timing:
        lines.append("  time:     " + ", ".join(f"{k} {_seconds(timing[k])}" for k in PHASES if k in timing))
    memory = f"  memory:   peak {_mb(record.get('peak_rss_mb') or 0)} host"
    if record.get("peak_device_mb"):
        memory += f", {_mb(record['peak_device_mb'])} device"
    plan = record.get("plan") or {}
    if plan.get("peak_host_mb"):
        memory += f" (planned {_mb(plan['peak_host_mb'])} host)"
    lines.append(memory)
    lines.append(f"  results:  {Path(run_dir) / RESULTS_FILE}")
    if model_dir is not None:
        lines.append(f"  model:    {model_dir}")
    if record.get("tracker"):
        lines.append(f"  tracking: {record['tracker']}")
    return "\n".join(lines)


def plan_line(plan: Mapping[str, Any]) -> str | None:
    """What the planner predicts for a long job (None for a short one): time, peak memory, execution."""
    if plan.get("seconds", 0) < LONG_JOB_S:
        return None
    memory = f"peak {_mb(plan['peak_host_mb'])} host"
    if plan.get("peak_device_mb") and plan.get("device", "cpu") != "cpu":
        memory += f", {_mb(plan['peak_device_mb'])} device"
    execution = ", ".join(f"{k}={plan[k]}" for k in ("offload", "stream", "factors") if k in plan)
    return f"plan: about {_seconds(plan['seconds'])}, {memory}, {plan.get('disk_mb', 0):.0f} MB disk; {execution}"
