"""logger=csv: a job's metrics, timings and outcome as rows of a CSV file, with no service at all.

The example of a logger written against the `_target_` interface (an MLflow one would look the same).
"""
from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stat_exp.track.logger import RunLogger, structure_rows


class CsvLogger(RunLogger):
    """Rows (step, key, value) in `<run_dir>/<file>`: every logged metric, then status and error."""

    def __init__(self, run_dir: str | Path, run_config: Mapping[str, Any], sweep_dir: str | Path | None = None,
                 name: str | None = None, job_type: str | None = None, file: str = "metrics.csv"):
        super().__init__(run_dir, run_config, sweep_dir, name, job_type)
        self.path = self.run_dir / file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._step = 0
        with self.path.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(["step", "key", "value"])
        self._write({"name": name or ""})

    @property
    def location(self) -> str | None:
        return str(self.path)

    def _write(self, values: Mapping[str, Any]) -> None:
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([self._step, key, value] for key, value in values.items())
        self._step += 1

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self._write(metrics)

    def log_structure(self, structure: Mapping[str, Sequence[int]]) -> None:
        self._write({f"structure/{name}/{row[0]}": value for row in structure_rows(structure)
                     for name, value in zip(("heads", "kv_heads", "neurons"), row[1:]) if value is not None})

    def finish(self, status: str, error: str | None = None) -> None:
        self._write({"status": status, **({"error": error} if error else {})})
