"""This project's STAT (`stat`) against the authors' procedure (`stat_paper`) at the same FLOPs budgets,
as a markdown table: perplexity of the embedded SmolLM2-135M at 0.9 / 0.7 / 0.5 of the FLOPs, and
held-out accuracy of the fine-tuned MiniLM polarity model at 0.7 / 0.5.

Every job is exactly what a user runs (the Hydra config and run_pipeline): SmolLM2 calibrated on
64 x 256 tokens of wiki_calib and scored on 16,384 tokens of wiki_eval (FLOPs at 256 tokens), as in
benchmarks.compare_pruners; MiniLM polarity calibrated on its 150 training sentences and scored on
the 50 held-out ones (FLOPs at 28 tokens), as in benchmarks.encoder_stat. stat_paper uses the
procedure of the authors' prune_opt.py on the decoder and of prune_bert.py on the encoder.

    python -m benchmarks.stat_vs_paper [--out DIR]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import report_table, run_job, save_table
from benchmarks.compare_pruners import SETTINGS as SMOLLM2
from benchmarks.encoder_stat import POLARITY_SEQ_LEN, polarity_settings
from stat_exp.track.results import RunRecord

PRUNERS = ["stat", "stat_paper"]
SUITES = {  # name: (settings, metric, budgets)
    "smollm2": (lambda: SMOLLM2, "perplexity/ppl", [0.9, 0.7, 0.5]),
    "polarity": (lambda: [*polarity_settings(), "logger=none", "progress=false", "device=cpu"], "glue/accuracy", [0.7, 0.5]),
}


def cell(result: RunRecord | str, metric: str) -> str:
    if isinstance(result, str):
        return f"failed: {result}"
    prune = result.timing_s.get("calibrate", 0.0) + result.timing_s.get("prune", 0.0)
    return f"{result.metrics[metric]:.3f} ({result.achieved['flops_fraction']:.3f}, {prune:.0f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench") / time.strftime("stat_vs_paper_%Y-%m-%d_%H-%M-%S"))
    args = parser.parse_args()
    lines = ["| model | metric | kept FLOPs | dense | stat | stat_paper |", "|---|---|---|---|---|---|"]
    for name, (settings, metric, budgets) in SUITES.items():
        base = settings()
        dense = run_job([*base, "pruner=none", "budget.flops=1.0"], args.out / f"{name}_dense")
        for flops in budgets:
            results = [run_job([*base, f"pruner={p}", f"budget.flops={flops}"], args.out / f"{name}_{p}_{flops}")
                       for p in PRUNERS]
            dense_cell = f"{dense.metrics[metric]:.3f}" if isinstance(dense, RunRecord) else f"failed: {dense}"
            lines.append(f"| {name} | {metric} | {flops} | {dense_cell} | "
                         + " | ".join(cell(r, metric) for r in results) + " |")
            print(lines[-1], flush=True)
    note = ("SmolLM2-135M: 64 x 256 calibration tokens of wiki_calib, perplexity on 16,384 wiki_eval tokens (FLOPs at "
            "256 tokens); MiniLM polarity: calibrated on its 150 training sentences, accuracy on the 50 held-out ones "
            f"(FLOPs at {POLARITY_SEQ_LEN} tokens). Each cell: metric (achieved FLOPs fraction, calibration + pruning "
            "seconds).")
    report_table("stat_vs_paper", save_table(lines, args.out, "stat_vs_paper"), note)
    print(f"Runs in {args.out}")


if __name__ == "__main__":
    main()
