"""llama.cpp's own tools run on a GGUF file: llama-perplexity and llama-bench, their output parsed.

llama-perplexity's protocol (tools/perplexity/perplexity.cpp): the text is tokenized whole, with
BOS first when the vocabulary adds one; `--chunks n` windows of `-c seq_len` tokens; each window's
first token is replaced by BOS where one is added; only the second half of each window is scored.
stat_exp.eval.perplexity's `protocol="llama_cpp"` computes the same in PyTorch. One window per
batch (`-b seq_len`), which every seq_len allows.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stat_exp.errors import UserError
from stat_exp.export import llama_cpp

_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+(?:e[+-]?\d+)?|nan|inf)")


class LlamaCppError(UserError):
    """A llama.cpp tool refused the file or the options (its last output line says why)."""


def all_threads() -> int:
    return len(os.sched_getaffinity(0))


def _run(name: str, args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run([str(llama_cpp.tool(name)), *args], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise LlamaCppError(f"{name} failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return done


def llama_perplexity(model: Path, text_file: Path, seq_len: int, chunks: int | None, threads: int | None = None) -> float:
    """llama-perplexity's final estimate over the first `chunks` windows (None: all)."""
    done = _run("llama-perplexity", ["-m", str(model), "-f", str(text_file), "-c", str(seq_len), "-b", str(seq_len),
                                    "--chunks", str(chunks if chunks is not None else -1),
                                    "-t", str(threads or all_threads())])
    log = done.stdout + done.stderr
    found = _FINAL.search(log)
    if found is None:
        lines = [line for line in log.splitlines() if line.strip()]
        raise LlamaCppError(f"llama-perplexity printed no estimate: {lines[-1] if lines else 'no output'}")
    return float(found.group(1))


@dataclass(frozen=True)
class BenchResult:
    """One llama-bench test: tokens per second over its repetitions."""

    test: str  # "pp512" (prompt processing) or "tg128" (generation)
    threads: int
    tokens_per_s: float
    std: float
    samples: tuple[float, ...]


def llama_bench(model: Path, prompt_tokens: int, gen_tokens: int, threads: int | None = None,
                repeats: int = 3, warmup: bool = True) -> dict[str, BenchResult]:
    """llama-bench's prompt processing (`pp`) and generation (`tg`) tests; keys "pp" and "tg".
    `warmup`: llama-bench's own untimed run before each test."""
    out = _run("llama-bench", ["-m", str(model), "-p", str(prompt_tokens), "-n", str(gen_tokens),
                               "-t", str(threads or all_threads()), "-r", str(repeats), "-o", "json",
                               *(() if warmup else ("--no-warmup",))]).stdout
    rows = json.loads(out[out.index("["): out.rindex("]") + 1])
    results = {}
    for row in rows:
        kind = "pp" if row["n_prompt"] > 0 else "tg"
        tokens = row["n_prompt"] or row["n_gen"]
        results[kind] = BenchResult(f"{kind}{tokens}", int(row["n_threads"]), float(row["avg_ts"]),
                                    float(row["stddev_ts"]), tuple(float(x) for x in row["samples_ts"]))
    return results
