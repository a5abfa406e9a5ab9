"""Held-out perplexity of STAT on SmolLM2 at several budgets: global versus uniform allocation,
with and without the correction (the ablation keeps the same selection and counts).

    python -m benchmarks.stat_quality [--budgets 0.9,0.8,0.7,0.6,0.5] [--examples 64] [--allocations global,uniform]
                                      [--no-ablation]

Calibration runs once; each variant prunes a copy of the model from the same scores.
"""
from __future__ import annotations

import argparse
import copy

from benchmarks.common import CPU, markdown, smollm2
from stat_exp.data.text import load_text
from stat_exp.eval.perplexity import perplexity
from stat_exp.factorize import GramBackend
from stat_exp.models import get_adapter
from stat_exp.prune.budget import allocate
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.runner import PruneRunner, shapes_of
from stat_exp.prune.stat import StatPruner

EVAL = {"seq_len": 256, "max_tokens": 16384, "batch_size": 8}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="0.9,0.8,0.7,0.6,0.5")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--allocations", default="global,uniform")
    parser.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the same selection without correction")
    args = parser.parse_args()
    model, tok, batches = smollm2(args.examples)
    text = load_text("wiki_eval")

    def ppl(m) -> float:
        return perplexity(m, tok, text, progress=False, **EVAL)["ppl"]

    runner = PruneRunner(StatPruner(), BudgetSpec(seq_len=256), GramBackend(), progress=False)
    adapter = get_adapter(model)
    shapes = shapes_of(adapter)
    scored = runner.score_layers(model, adapter, batches, CPU)
    allocations = args.allocations.split(",")
    dense = ppl(model)
    methods = ("STAT", "no correction") if args.ablation else ("STAT",)
    rows = [{"kept FLOPs": 1.0, **{f"{m} {a}": dense if m == "STAT" else "" for a in allocations for m in methods}}]
    print(f"dense: {dense:.2f}", flush=True)
    for target in (float(b) for b in args.budgets.split(",")):
        row = {"kept FLOPs": target}
        for allocation in allocations:
            plans = allocate([sc for sc, _ in scored], shapes, runner.flops, target, allocation)
            for correction in (True, False) if args.ablation else (True,):
                pruned = copy.deepcopy(model)
                PruneRunner(StatPruner(correction=correction), BudgetSpec(seq_len=256), None, progress=False
                            ).apply_plans(get_adapter(pruned), scored, plans)
                name = f"{'STAT' if correction else 'no correction'} {allocation}"
                row[name] = ppl(pruned)
                print(f"{target} {name}: {row[name]:.2f}", flush=True)
        rows.append(row)
    print(f"\nHeld-out wiki perplexity, SmolLM2-135M, {args.examples} x 256 calibration tokens, "
          f"{EVAL['max_tokens']} evaluation tokens in chunks of {EVAL['seq_len']}:\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
