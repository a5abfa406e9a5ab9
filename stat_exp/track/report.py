"""Sweep reports: every job's results.json gathered into one table, a plot, and optionally a W&B run."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from stat_exp.errors import one_line
from stat_exp.track.logger import make_logger
from stat_exp.track.markdown import markdown_table
from stat_exp.track.plots import metric_plot
from stat_exp.track.published import COLUMNS as PUBLISHED
from stat_exp.track.published import published_columns
from stat_exp.track.results import RESULTS_FILE
from stat_exp.track.sweep import KILLED, MISSING, SweepJobs, sweep_jobs


def collect(sweep_dir: Path, jobs: SweepJobs | None = None) -> list[dict]:
    """One record per job of the sweep (its manifest's jobs; without a manifest, every job folder),
    failed jobs included; "run_dir" says where each was. A job whose results.json is missing or cannot
    be read is a failed record saying why."""
    sweep_dir = Path(sweep_dir)
    jobs = jobs or sweep_jobs(sweep_dir)
    return [_job_record(sweep_dir, run_dir, jobs.names.get(run_dir, {})) for run_dir in jobs.current]


def _job_record(sweep_dir: Path, run_dir: str, names: Mapping[str, Any]) -> dict:
    path = sweep_dir / run_dir / RESULTS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or "status" not in record or "pruner" not in record:
            raise ValueError("not a results record")
    except FileNotFoundError:
        record = {"status": "failed", "error": MISSING}
    except (OSError, ValueError) as e:
        record = {"status": "failed", "error": f"results.json cannot be read: {one_line(e)}"}
    else:
        record["published"] = published_columns(record, path.parent)
    record.setdefault("pruner", names.get("pruner") or "?")
    record.setdefault("model", names.get("model"))
    return record | {"run_dir": run_dir}


def label(record: Mapping[str, Any]) -> str:
    """The pruner's name, with its variant when the run has one: "stat (no correction)"."""
    variant = record.get("variant")
    return f"{record['pruner']} ({variant})" if variant else record["pruner"]


def _short(key: str) -> str:
    return key.removesuffix("_fraction")


def _row(record: Mapping[str, Any]) -> dict[str, Any]:
    achieved = record.get("achieved") or {}
    timing = record.get("timing_s") or {}
    row = {"pruner": label(record), "model": record.get("model")}
    row |= {f"target_{_short(k)}": v for k, v in (record.get("target") or {}).items()}
    row |= {f"achieved_{_short(k)}": achieved.get(k) for k in ("flops_fraction", "params_fraction")}
    row |= record.get("metrics") or {}
    row |= record.get("published") or {}
    row |= {"prune_s": timing.get("prune"), "total_s": timing.get("total")}
    row |= {"status": record.get("status"), "error": record.get("error"), "run_dir": record.get("run_dir")}
    return row


def to_table(records: list[dict], metric: str | None = None) -> pd.DataFrame:
    """One row per job, sorted by pruner then target descending; `metric` becomes the first metric column."""
    df = pd.DataFrame([_row(r) for r in records])
    if df.empty:
        return df
    targets = sorted(c for c in df.columns if c.startswith("target_"))
    metrics = _metric_names(records)
    if metric in metrics:
        metrics.remove(metric)
        metrics.insert(0, metric)
    fixed = ["pruner", "model", *targets, "achieved_flops", "achieved_params"]
    published = [c for c in PUBLISHED if c in df.columns]
    df = df[[*fixed, *metrics, *published, "prune_s", "total_s", "status", "error", "run_dir"]]
    return df.sort_values(
        ["pruner", *targets], ascending=[True, *[False] * len(targets)], kind="stable", na_position="last"
    ).reset_index(drop=True)


def _metric_names(records: list[dict], status: str | None = None) -> list[str]:
    """Metric names in order of first appearance, over all records or those with the given status."""
    chosen = [r for r in records if status is None or r.get("status") == status]
    return list(dict.fromkeys(k for r in chosen for k in r.get("metrics") or {}))


def main_metric(names: Sequence[str], objective: str | None = None) -> str | None:
    """The metric a job returns to a sweeper and a report plots: `objective` when it is among `names`,
    else (no objective) the first perplexity, else the first metric."""
    if objective is not None:
        return objective if objective in names else None
    return next((k for k in names if k.endswith("/ppl")), names[0] if names else None)


def choose_metric(records: list[dict]) -> str | None:
    """The metric to plot when none is named: the ok runs' main metric."""
    return main_metric(_metric_names(records, "ok"))


@dataclass(frozen=True)
class SweepOutcome:
    """What the jobs of a sweep left behind: how many there are and which failed, with their errors;
    `earlier`: job folders of earlier sweeps in the same folder (not counted)."""

    jobs: int
    failed: list[tuple[str, str]]  # (run_dir relative to the sweep, one-line error)
    earlier: list[str] = field(default_factory=list)


def outcome(sweep_dir: Path) -> SweepOutcome:
    """Read from the jobs' own files, so it is the same whichever launcher ran them: a failed record,
    a record still "running" (the job was killed), a missing or unreadable results.json."""
    jobs = sweep_jobs(sweep_dir)
    records = collect(sweep_dir, jobs)
    failed = [(r["run_dir"], KILLED if r["status"] == "running" else r.get("error") or "failed")
              for r in records if r["status"] != "ok"]
    return SweepOutcome(jobs=len(records), failed=failed, earlier=jobs.earlier)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("\n", " ")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table, without depending on tabulate."""
    return markdown_table(list(df.columns), ([_cell(v) for v in row] for row in df.itertuples(index=False))) + "\n"


def write_report(sweep_dir: Path, metric: str | None = None) -> dict[str, Path]:
    """Write report.csv, report.md and report.png (when there is a metric to plot) into sweep_dir."""
    sweep_dir = Path(sweep_dir)
    jobs = sweep_jobs(sweep_dir)
    paths = write_tables(collect(sweep_dir, jobs), sweep_dir, metric, f"Sweep report: {sweep_dir.name}")
    if jobs.earlier:
        with paths["md"].open("a", encoding="utf-8") as md:
            md.write(f"\nNot part of this sweep (left by earlier sweeps): {', '.join(jobs.earlier)}\n")
    return paths


def collect_runs(dirs: Sequence[Path]) -> list[dict]:
    """Every results.json below each of `dirs` (runs and sweeps alike, from any day), each once;
    "run_dir" names the job's folder as given on the command line."""
    records, seen = [], set()
    for top in map(Path, dirs):
        for record in collect(top):
            folder = (top / record["run_dir"]).resolve()
            if folder not in seen:
                seen.add(folder)
                records.append(record | {"run_dir": str(top / record["run_dir"]).removesuffix("/.")})
    return records


def write_tables(records: list[dict], out_dir: Path, metric: str | None = None,
                 title: str = "Report") -> dict[str, Path]:
    """report.csv (every run), report.md (ok runs, then the failed ones apart) and report.png (the
    metric against achieved FLOPs, when there is one to plot) in out_dir."""
    if not records:
        raise FileNotFoundError(f"no {RESULTS_FILE} found")
    available = _metric_names(records, "ok")
    if metric is not None and metric not in available:
        raise ValueError(f"metric {metric!r} is in no ok run; available: {', '.join(available) or 'none'}")
    metric = metric or choose_metric(records)
    df = to_table(records, metric)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "report.csv", "md": out_dir / "report.md"}
    df.to_csv(paths["csv"], index=False)
    ok, failed = df[df["status"] == "ok"], df[df["status"] != "ok"]
    text = f"# {title}\n\nPlotted metric: {metric or 'none'}\n\n" + to_markdown(ok.drop(columns=["error"]))
    if not failed.empty:
        text += f"\n## Failed runs ({len(failed)})\n\n" + to_markdown(failed[["pruner", "model", "status", "error",
                                                                              "run_dir"]])
    paths["md"].write_text(text, encoding="utf-8")
    if metric is not None and not ok.empty:
        paths["png"] = out_dir / "report.png"
        metric_plot(df, metric, paths["png"])
    return paths


def print_table(df: pd.DataFrame) -> None:
    """Show the report at the end of a sweep; off a terminal (a log file), wide lines, not folded cells."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=False)
    for column in df.columns:
        table.add_column(column, overflow="fold")
    for row in df.itertuples(index=False):
        table.add_row(*(Text(_cell(v)) for v in row))  # Text: an error's "[...]" is not markup
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 240))
    console.print(table)


def log_report(sweep_dir: Path, paths: Mapping[str, Path], logger_cfg: Mapping | None) -> None:
    """The report as one more run of the sweep's logger (for W&B: job_type "report", in the sweep's
    group), holding the table and the plot."""
    if not logger_cfg or "_target_" not in logger_cfg:
        return
    sweep_dir = Path(sweep_dir)
    logger = make_logger(logger_cfg, sweep_dir, {"sweep_dir": str(sweep_dir.resolve())}, sweep_dir,
                         name="report", job_type="report")
    with logger as run:
        run.log_table("report", pd.read_csv(paths["csv"]))
        if "png" in paths:
            run.log_image("report_plot", paths["png"])
