"""STAT and the baselines on the embedded MiniLM-L6 encoder: what embedding quality and task accuracy
survive at a FLOPs budget, as a markdown table.

Two jobs per (pruner, budget), each exactly what a user runs (Hydra config + run_pipeline):
- `minilm_l6`, calibrated on 128 windows of 128 tokens of wiki_calib, scored with eval=embedding
  (Lee document-similarity and SimLex-999 Spearman, Pang & Lee 5-fold probe accuracy);
- `minilm_l6_polarity` (MiniLM fine-tuned on 150 Pang & Lee sentences, prepared once), calibrated on
  those 150 training sentences (calib=glue), scored on the 50 held-out ones (eval=glue).
FLOPs are counted at 128 tokens for the first and 28 (the sentences' mean tokenized length) for the
second. Every job's results.json lands under --out.

    python -m benchmarks.encoder_stat [--flops 0.7 0.5] [--pruners stat magnitude_sp ...]

`kfold` compares the methods on a task model with enough labelled sentences to tell them apart
(see benchmarks/encoder_kfold.py):

    python -m benchmarks.encoder_stat kfold [--corpus rotten_tomatoes] [--pool 600] [--folds 3]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import report_table, run_job, save_table
from stat_exp.finetune.classifier import ensure_polarity_model
from stat_exp.track.results import RunRecord

PRUNERS = ["stat", "stat_nocorr", "magnitude_sp", "wanda_sp", "flap", "kwon", "random"]  # kwon: task loss only
COMMON = ["logger=none", "progress=false", "device=cpu"]
EMBEDDING = ["model=minilm_l6", "eval=embedding", "calib=wiki", "calib.source=wiki_calib", "calib.num_examples=128",
             "calib.seq_len=128", "calib.batch_size=16", "budget.seq_len=128"]
POLARITY_SEQ_LEN = 28  # mean tokenized length of the Pang & Lee sentences (27.4 train, 28.6 held out)


def polarity_settings() -> list[str]:
    return ["model=minilm_l6_polarity", f"model.source={ensure_polarity_model()}", "eval=glue", "calib=glue",
            f"budget.seq_len={POLARITY_SEQ_LEN}"]


def cell(result: RunRecord | str, key: str, dense: RunRecord) -> str:
    """value (share of dense)"""
    if isinstance(result, str):
        return "failed"
    value, ref = result.metrics[key], dense.metrics[key]
    return f"{value:.3f} ({100 * value / ref:.0f}%)"


def row(pruner: str, flops: float, emb: RunRecord | str, pol: RunRecord | str,
        dense: tuple[RunRecord, RunRecord]) -> str:
    done = next((r for r in (emb, pol) if isinstance(r, RunRecord)), None)  # kwon: only the task model has a loss
    label = done.pruner + (f" ({done.variant})" if done.variant else "") if done else pruner
    achieved = f"{done.achieved['flops_fraction']:.3f}" if done else "-"
    cells = [cell(emb, f"embedding/{k}", dense[0]) for k in ("lee_spearman", "simlex_spearman", "polarity_acc")]
    errors = [r for r in (emb, pol) if isinstance(r, str)]
    return (f"| {label} | {flops} | {achieved} | {' | '.join(cells)} | {cell(pol, 'glue/accuracy', dense[1])} |"
            + (f" {errors[0]} |" if errors else " |"))


def main() -> None:
    import sys

    if sys.argv[1:2] == ["kfold"]:
        from benchmarks.encoder_kfold import main as kfold

        return kfold(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--pruners", nargs="+", default=PRUNERS)
    parser.add_argument("--out", type=Path,
                        default=Path("outputs/bench") / time.strftime("encoder_stat_%Y-%m-%d_%H-%M-%S"))
    args = parser.parse_args()
    suites = {"embedding": EMBEDDING, "polarity": polarity_settings()}

    def both(pruner: str, flops: float) -> tuple[RunRecord | str, RunRecord | str]:
        return tuple(run_job([*s, *COMMON, f"pruner={pruner}", f"budget.flops={flops}"],
                             args.out / f"{name}_{pruner}_{flops}") for name, s in suites.items())

    dense = both("none", 1.0)
    if any(isinstance(d, str) for d in dense):
        raise SystemExit(f"dense jobs failed: {dense}")
    lines = ["| pruner | kept FLOPs | achieved | Lee Spearman | SimLex Spearman | polarity probe acc | "
             "fine-tuned held-out acc | note |", "|---|---|---|---|---|---|---|---|", row("dense", 1.0, *dense, dense)]
    print(lines[-1], flush=True)
    for flops in args.flops:
        for pruner in args.pruners:
            lines.append(row(pruner, flops, *both(pruner, flops), dense))
            print(lines[-1], flush=True)
    note = ("Lee, SimLex and polarity probe: minilm_l6 calibrated on 128 x 128 tokens of wiki_calib (FLOPs at 128 "
            "tokens); fine-tuned held-out acc: minilm_l6_polarity calibrated on its 150 Pang & Lee training sentences, "
            f"scored on the 50 held-out ones (FLOPs at {POLARITY_SEQ_LEN} tokens). Share of dense in parentheses.")
    report_table("encoder_stat", save_table(lines, args.out, "encoder_stat"), note)
    print(f"Runs in {args.out}")


if __name__ == "__main__":
    main()
