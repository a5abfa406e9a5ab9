"""Shared set-up for the benchmarks: the embedded SmolLM2 and its calibration batches."""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from stat_exp.config.cli import compose_config
from stat_exp.data.calibration import calibration_batches
from stat_exp.models.loading import load_model
from stat_exp.pipeline import run_pipeline
from stat_exp.track.markdown import markdown_table
from stat_exp.track.results import RunRecord

CPU = torch.device("cpu")


def smollm2(num_examples: int = 64, seq_len: int = 256, batch_size: int = 8):
    """(model, tokenizer, calibration batches) on the embedded SmolLM2-135M and wiki calibration text."""
    model, tok = load_model("smollm2_135m")
    return model, tok, calibration_batches(tok, "wiki_calib", num_examples, seq_len, 0, batch_size)


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    return markdown_table(keys, ([f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows))


def run_job(overrides: list[str], out: Path) -> RunRecord | str:
    """Exactly what a user runs (the Hydra config composed with `overrides`, then run_pipeline into
    `out`): its record, or the error line when it failed (its results.json says the same)."""
    cfg = compose_config(overrides)
    try:
        return run_pipeline(cfg, out)
    except Exception as e:  # noqa: BLE001 - one failed job must not stop a comparison
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def save_table(lines: list[str], out: Path, name: str) -> str:
    """Write a markdown table next to the jobs' run directories; returns it."""
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table + "\n", encoding="utf-8")
    return table


RESULTS = Path(__file__).resolve().parent / "results"


def _commit() -> str:
    """The commit the measurement ran at, marked when the working tree had changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=RESULTS.parent, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


MEASURED_AT = _commit()  # at start: the tree may move on while a long benchmark runs


def machine() -> str:
    """One line on what measured it: processor, cores, threads torch used, memory, torch version."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, {memory:.0f} GiB, torch {torch.__version__}, "
            f"Python {platform.python_version()}").replace("  ", " ")


def record_result(name: str, body: str, note: str = "") -> Path:
    """Write benchmarks/results/<name>.md: the table with the command that made it, the commit and the
    machine, so a table and the code that measured it cannot drift apart silently."""
    command = "python -m " + " ".join([__package__ + "." + Path(sys.argv[0]).stem if sys.argv[0].endswith(".py")
                                       else sys.argv[0], *map(shlex.quote, sys.argv[1:])])
    header = (f"# {name}\n\nCommand: `{command}`  \nCommit: {MEASURED_AT}  \nMachine: {machine()}  \n"
              f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(header + (note + "\n\n" if note else "") + body.rstrip() + "\n", encoding="utf-8")
    return path


def report_table(name: str, table: str | list[dict], note: str = "") -> Path:
    """Print a benchmark's table (markdown text, or rows for `markdown`) under its note, and record both
    in benchmarks/results/<name>.md: every printed table also lands where its code lives."""
    body = table if isinstance(table, str) else markdown(table)
    path = record_result(name, body, note)
    print(f"\n{note}\n\n{body}\n\nwritten to {path}", flush=True)
    return path
