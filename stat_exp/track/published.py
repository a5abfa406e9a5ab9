"""Published numbers beside measured ones: the sweep report's columns published_metric, measured, published.

A paper experiment lists what it reproduces under `published.results`: per model its metric, the
dense value, and per pruner the value at each kept-FLOPs fraction. Each job's Hydra config
(`<run dir>/.hydra/config.yaml`) holds that table, so the report finds the entry of a job by its
model, pruner and target, with no change to results.json. Any pruner at 1.0 of the FLOPs is dense.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

JOB_CONFIG = Path(".hydra") / "config.yaml"
COLUMNS = ("published_metric", "measured", "published")


def published_value(results: Mapping[str, Any], model: str, pruner: str, flops: float) -> tuple[str, float] | None:
    """(metric, value) published for this model, pruner and kept-FLOPs fraction, if any."""
    entry = results.get(model)
    if not entry:
        return None
    if abs(flops - 1.0) < 1e-9:
        value = entry.get("dense")
    else:
        value = next((v for f, v in (entry.get(pruner) or {}).items() if abs(float(f) - flops) < 1e-9), None)
    return (entry["metric"], float(value)) if value is not None else None


def published_columns(record: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """The report columns for one job (empty when its experiment publishes nothing for it)."""
    path = Path(run_dir) / JOB_CONFIG
    if not path.is_file():
        return {}
    results = ((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("published") or {}).get("results") or {}
    flops = (record.get("target") or {}).get("flops_fraction")
    found = published_value(results, record.get("model"), record.get("pruner"), float(flops)) if flops else None
    if found is None:
        return {}
    metric, value = found
    return {"published_metric": metric, "measured": (record.get("metrics") or {}).get(metric), "published": value}
