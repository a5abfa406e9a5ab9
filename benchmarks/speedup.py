"""Does a STAT-pruned SmolLM2 run faster? Prefill and decode speed of dense versus pruned models at
several budgets and neuron roundings (budget.round_to), with the perplexity each rounding costs.

    python -m benchmarks.speedup [--budgets 0.9,0.7,0.5] [--round-to 1,8,32,64] [--examples 64]
                                 [--rounds 10] [--eval-tokens 8192] [--threads 1]

Calibration runs once; every variant prunes a copy of the model from the same scores (global
allocation). For each budget the dense model and that budget's variants are timed side by side in
one process, interleaved round by round (one prefill and one decode run of each model per round),
so load from other processes on a shared machine hits them alike; a speedup is the median over
rounds of dense time / pruned time within the round. Prefill: batch 1 x 256 random tokens, the
last position's logits only (as in generate). Decode: 32 greedy tokens through the KV cache after
that prefill. Timing runs on --threads CPU threads (default 1: on a machine that other jobs share,
two-thread OpenMP regions stall whenever another process holds a core, and the timings then measure
the stalls, not the model).
"""
from __future__ import annotations

import argparse
import copy

import numpy as np
import torch

from benchmarks.common import CPU, report_table, smollm2
from stat_exp.data.text import load_text
from stat_exp.eval.latency import DecodeRun, prefill_run, time_runs
from stat_exp.eval.perplexity import perplexity
from stat_exp.factorize import GramBackend
from stat_exp.models import get_adapter
from stat_exp.models.flops import model_flops, shapes_of
from stat_exp.prune.budget import BudgetSpec, allocate
from stat_exp.prune.runner import PruneRunner
from stat_exp.prune.stat import StatPruner

SEQ_LEN, DECODE_TOKENS, WARMUP_ROUNDS = 256, 32, 2


def timed_side_by_side(models: dict[str, torch.nn.Module], rounds: int, threads: int) -> dict[str, dict[str, np.ndarray]]:
    """{name: {"prefill": seconds per round, "decode": seconds per round}}, models interleaved."""
    ids = torch.randint(0, next(iter(models.values())).config.vocab_size, (1, SEQ_LEN),
                        generator=torch.Generator().manual_seed(0))
    times = {name: {"prefill": [], "decode": []} for name in models}
    with torch.inference_mode():
        runs = {name: (prefill_run(m, ids), DecodeRun(m, ids, DECODE_TOKENS)) for name, m in models.items()}
        for r in range(WARMUP_ROUNDS + rounds):
            for name, (prefill, decode) in runs.items():
                p = time_runs(prefill, 0, 1, threads=threads)[0]
                d = time_runs(decode, 0, 1, setup=decode.setup, threads=threads)[0]
                if r >= WARMUP_ROUNDS:
                    times[name]["prefill"].append(p)
                    times[name]["decode"].append(d)
    return {name: {k: np.array(v) for k, v in t.items()} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="0.9,0.7,0.5")
    parser.add_argument("--round-to", default="1,8,32,64")
    parser.add_argument("--examples", type=int, default=64, help="calibration sequences of 256 tokens")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per model (after 2 warm-up rounds)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads while timing")
    args = parser.parse_args()
    print(f"torch {torch.__version__}; timing on {args.threads} thread(s), the rest on {torch.get_num_threads()}", flush=True)
    model, tok, batches = smollm2(args.examples)
    text = load_text("wiki_eval")

    def ppl(m) -> float:
        return perplexity(m, tok, text, SEQ_LEN, args.eval_tokens, 8, progress=False)["ppl"]

    runner = PruneRunner(StatPruner(), BudgetSpec(seq_len=SEQ_LEN), GramBackend(), progress=False)
    adapter = get_adapter(model)
    shapes, dense_flops = shapes_of(adapter), model_flops(adapter, runner.flops)
    scored = runner.score_layers(model, adapter, batches, CPU)
    rows = [{"kept FLOPs": 1.0, "round_to": "", "achieved": 1.0, "ppl": ppl(model), "prefill tok/s": "",
             "prefill speedup": 1.0, "decode ms/token": "", "decode speedup": 1.0}]
    for target in (float(b) for b in args.budgets.split(",")):
        variants = {}
        for round_to in (int(r) for r in args.round_to.split(",")):
            plans = allocate([sc for sc, _ in scored], shapes, runner.flops, target, "global", round_to)
            pruned = copy.deepcopy(model)
            runner.apply_plans(get_adapter(pruned), scored, plans)
            variants[round_to] = pruned
        times = timed_side_by_side({"dense": model, **variants}, args.rounds, args.threads)
        dense = times.pop("dense")
        rows[0]["prefill tok/s"] = f"{SEQ_LEN / np.median(dense['prefill']):.0f}"
        rows[0]["decode ms/token"] = f"{1e3 * np.median(dense['decode']) / DECODE_TOKENS:.1f}"
        for round_to, pruned in variants.items():
            t = times[round_to]
            row = {"kept FLOPs": target, "round_to": round_to,
                   "achieved": model_flops(get_adapter(pruned), runner.flops) / dense_flops, "ppl": ppl(pruned),
                   "prefill tok/s": f"{SEQ_LEN / np.median(t['prefill']):.0f}",
                   "prefill speedup": float(np.median(dense["prefill"] / t["prefill"])),
                   "decode ms/token": f"{1e3 * np.median(t['decode']) / DECODE_TOKENS:.1f}",
                   "decode speedup": float(np.median(dense["decode"] / t["decode"]))}
            rows.append(row)
            print(row, flush=True)
        del variants, times
    report_table("speedup", rows, f"SmolLM2-135M, STAT global, {args.examples} x 256 calibration tokens; perplexity on "
                 f"{args.eval_tokens} wiki_eval tokens; speed at batch 1 x {SEQ_LEN} tokens on {args.threads} thread(s), "
                 f"{args.rounds} interleaved rounds; a speedup is the median over rounds of dense / pruned time within "
                 f"the round (decode: {DECODE_TOKENS} greedy tokens after the prefill).")


if __name__ == "__main__":
    main()
