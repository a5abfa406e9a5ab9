"""STAT's quality options on SmolLM2: chosen on held-out text, reported on wiki_eval.

    python -m benchmarks.stat_quality options  [--examples 64] [--variants ...] [--budgets 0.7,0.5]
    python -m benchmarks.stat_quality sizes    [--sizes 64,128,256,512,1024] [--variants ...]
    python -m benchmarks.stat_quality sequential [--examples 64]
    python -m benchmarks.stat_quality report   [--examples 128] [--budgets 0.9,0.8,0.7,0.6,0.5]
    python -m benchmarks.stat_quality encoder  [--variants ...] [--budgets 0.7,0.5] [--allocation uniform]
    python -m benchmarks.stat_quality transfer [--examples 64] [--budgets 0.9,0.8,0.7,0.6,0.5] [--variants ...]

`options`, `sizes` and `sequential` are the study (see benchmarks/held_out.py: calibration from
wiki_calib without its last articles, perplexity on those articles): one table per option, each
variant against today's default on the same statistics (streamed once, every variant prunes a
copy). `sizes` grows one calibration stream and scores it at every size, with the overfitting of
the FFN correction (held-out / in-sample error at the 0.7 plan). `sequential` runs whole jobs
(its statistics need the pruned model's own stream). `report` compares the shipped STAT, its
no-correction ablation and the recommended options on wiki_eval, global and uniform, at every budget. `encoder` checks variants on the other
architecture we have: the fine-tuned MiniLM polarity model (ordinary jobs, as benchmarks.encoder_stat),
held-out accuracy. `transfer` checks that the global allocation beats uniform on every architecture
we can run (SmolLM2: validation perplexity; the MiniLM-L6 sentence encoder: how far its embeddings
of the validation text move), with the fewest heads and neurons the global allocation leaves a layer.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from benchmarks.common import CPU, markdown, smollm2
from benchmarks.held_out import SEQ_LEN, Statistics, calibration_batches, split_wiki_calib, validation_ppl
from stat_exp.data.text import encode, load_text
from stat_exp.eval.perplexity import perplexity
from stat_exp.factorize import GramBackend
from stat_exp.models import get_adapter
from stat_exp.models.flops import FlopsModel, shapes_of
from stat_exp.models.loading import load_model
from stat_exp.prune.budget import BudgetSpec, allocate
from stat_exp.prune.runner import PruneRunner
from stat_exp.prune.stat import StatPruner

FLOPS = FlopsModel(256)
DEFAULT: dict = {}  # pruner=stat as shipped
RECOMMENDED: dict = {"ridge": "auto", "costs": "held_out"}  # best on the validation text at 0.7 and below (README)
VARIANTS = {
    "today's default": DEFAULT,
    "ridge 0.3": {"ridge": 0.3},
    "ridge auto": {"ridge": "auto"},
    "greedy heads": {"heads": "greedy"},
    "intercept": {"intercept": True},
    "held-out costs": {"costs": "held_out"},
    "ridge auto + greedy heads": {"ridge": "auto", "heads": "greedy"},
    "ridge 0.3 + held-out costs": {"ridge": 0.3, "costs": "held_out"},
    "ridge auto + held-out costs": RECOMMENDED,
}
SEQUENTIAL = {"propagate dense (default)": ({}, "dense"), "propagate pruned": ({}, "pruned"),
              "compensate (propagate pruned, dense targets)": ({"compensate": True}, "pruned")}


def prune_copy(model, stats: Statistics, pruner: StatPruner, scored, target: float, allocation: str):
    plans = allocate([sc for sc, _ in scored], shapes_of(stats.adapter), FLOPS, target, allocation)
    pruned = copy.deepcopy(model)
    PruneRunner(pruner, BudgetSpec(seq_len=256), None, progress=False).apply_plans(get_adapter(pruned), scored, plans)
    return pruned, plans


def options(args) -> None:
    model, tok = load_model("smollm2_135m")
    stats = Statistics(model)
    stats.grow(calibration_batches(tok, args.examples))
    rows = [{"variant": "dense", **{str(b): validation_ppl(model, tok, args.max_tokens) for b in args.budgets[:1]}}]
    for name in args.variants:
        pruner = StatPruner(**VARIANTS[name])
        start = time.perf_counter()
        scored = stats.scored(pruner)
        row = {"variant": name, "score (s)": time.perf_counter() - start}
        for target in args.budgets:
            pruned, plans = prune_copy(model, stats, pruner, scored, target, args.allocation)
            row[str(target)] = validation_ppl(pruned, tok, args.max_tokens)
            row[f"min neurons {target}"] = min(p.neurons for p in plans)
        rows.append(row)
        print(row, flush=True)
    print(f"\nValidation perplexity (last {args.max_tokens} tokens rule: first {args.max_tokens} of the held-out "
          f"articles), {args.examples} x 256 calibration tokens, allocation {args.allocation}:\n")
    print(markdown(_fill(rows)))


def sizes(args) -> None:
    model, tok = load_model("smollm2_135m")
    stats = Statistics(model)
    batches = calibration_batches(tok, max(args.sizes))
    rows, done = [], 0
    for size in args.sizes:
        stats.grow(batches[done // 8: size // 8])
        done = size
        row = {"sequences": size, "tokens": size * 256}
        for name in args.variants:
            pruner = StatPruner(**VARIANTS[name])
            scored = stats.scored(pruner)
            for target in args.budgets:
                pruned, _ = prune_copy(model, stats, pruner, scored, target, "global")
                row[f"{name} {target}"] = validation_ppl(pruned, tok, args.max_tokens)
        row["held-out / in-sample FFN error at 0.7"] = overfitting(stats)
        rows.append(row)
        print(row, flush=True)
    print(f"\nValidation perplexity by calibration size ({args.max_tokens} validation tokens):\n")
    print(markdown(rows))


def overfitting(stats: Statistics, target: float = 0.7) -> float:
    """Summed over layers at the plan's neuron counts: the FFN correction's error on held-out
    batches (fitted without them) over its error on the tokens it was fitted to."""
    fit = stats.scored(StatPruner(heads="greedy"))  # the plain fold's in-sample curve
    held = stats.scored(StatPruner(heads="greedy", costs="held_out"))
    plans = allocate([sc for sc, _ in fit], shapes_of(stats.adapter), FLOPS, target, "global")
    scale = [st.typical_energy for _, st in fit]
    inside = sum(sc.ffn_cost[p.neurons] * s for (sc, _), p, s in zip(fit, plans, scale))
    outside = sum(sc.ffn_cost[p.neurons] * s for (sc, _), p, s in zip(held, plans, scale))
    return float(outside / inside)


def sequential(args) -> None:
    model, tok = load_model("smollm2_135m")
    batches = calibration_batches(tok, args.examples)
    rows = []
    for name, (kwargs, propagate) in SEQUENTIAL.items():
        row = {"variant": name}
        for target in args.budgets:
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            PruneRunner(StatPruner(**kwargs), BudgetSpec(target, 256), GramBackend(), propagate, progress=False).run(
                pruned, get_adapter(pruned), batches, CPU)
            row[f"prune (s) {target}"] = time.perf_counter() - start
            row[str(target)] = validation_ppl(pruned, tok, args.max_tokens)
        rows.append(row)
        print(row, flush=True)
    print(f"\nValidation perplexity, {args.examples} x 256 calibration tokens, global allocation:\n")
    print(markdown(rows))


def report(args) -> None:
    model, tok, batches = smollm2(args.examples)
    text = load_text("wiki_eval")

    def ppl(m) -> float:
        return perplexity(m, tok, text, seq_len=256, max_tokens=16384, batch_size=8, progress=False)["ppl"]

    pruners = {"STAT": StatPruner(**DEFAULT), "no correction": StatPruner(correction=False),
               "ridge auto + held-out costs": StatPruner(**RECOMMENDED)}
    dense = ppl(model)
    rows = [{"kept FLOPs": "1.0 (dense)", **{f"{n} {a}": dense for n in pruners for a in ("global", "uniform")}}]
    stats = Statistics(model)
    stats.grow(batches)
    scored = {name: stats.scored(pruner) for name, pruner in pruners.items()}
    for target in args.budgets:
        row = {"kept FLOPs": target}
        for name, pruner in pruners.items():
            for allocation in ("global", "uniform"):
                row[f"{name} {allocation}"] = ppl(prune_copy(model, stats, pruner, scored[name], target, allocation)[0])
        rows.append(row)
        print(row, flush=True)
    print(f"\nwiki_eval perplexity (16,384 tokens), {args.examples} x 256 calibration tokens of wiki_calib:\n")
    print(markdown(_fill(rows)))


def encoder(args) -> None:
    from pathlib import Path

    from benchmarks.common import run_job
    from benchmarks.encoder_stat import polarity_settings

    out = Path("outputs/benchmarks/stat_quality_encoder")
    base = [*polarity_settings(), "logger=none", "progress=false", "device=cpu", "pruner=stat",
            f"budget.allocation={args.allocation}"]
    dense = run_job([*base, "budget.flops=1.0"], out / "dense")
    rows = [{"variant": "dense", **{str(t): dense.metrics["glue/accuracy"] for t in args.budgets[:1]}}]
    for name in args.variants:
        row = {"variant": name}
        overrides = [f"pruner.{key}={value}" for key, value in VARIANTS[name].items()]
        slug = "".join(c if c.isalnum() else "_" for c in name)
        for target in args.budgets:
            r = run_job([*base, f"budget.flops={target}", *overrides], out / f"{slug}_{target}")
            row[str(target)] = r.metrics["glue/accuracy"] if not isinstance(r, str) else r
        rows.append(row)
        print(row, flush=True)
    print(f"\nMiniLM polarity, held-out accuracy (50 sentences), calibrated on its 150 training sentences, "
          f"allocation {args.allocation}:\n")
    print(markdown(_fill(rows)))


def transfer(args) -> None:
    pruners = {name: StatPruner(**VARIANTS[name]) for name in args.variants}
    for name, label in (("smollm2_135m", "validation perplexity"),
                        ("minilm_l6", "embedding drift: 100 x (1 - cosine to the dense embedding)")):
        model, tok = load_model(name)
        stats = Statistics(model)
        stats.grow(calibration_batches(tok, args.examples))
        score = ((lambda m: validation_ppl(m, tok, args.max_tokens)) if name.startswith("smollm2")
                 else embedding_drift(model, tok, args.max_tokens))
        dense = score(model)
        rows = [{"kept FLOPs": "1.0 (dense)", **{f"{p} {a}": dense for p in pruners for a in ("global", "uniform")}}]
        width = stats.adapter.ffn(stats.adapter.layers()[0]).width
        for target in args.budgets:
            rows.append({"kept FLOPs": target})
        for pruner_name, pruner in pruners.items():
            scored = stats.scored(pruner)
            for row, target in zip(rows[1:], args.budgets):
                for allocation in ("uniform", "global"):
                    pruned, plans = prune_copy(model, stats, pruner, scored, target, allocation)
                    row[f"{pruner_name} {allocation}"] = score(pruned)
                row[f"{pruner_name}: fewest heads / neurons (of {width}) in a layer"] = (
                    f"{min(len(sc.attn_levels[p.attn_level].heads) for (sc, _), p in zip(scored, plans))} / "
                    f"{min(p.neurons for p in plans)}")
                print(name, row, flush=True)
        print(f"\n{name}: {label}, {args.examples} x {SEQ_LEN} calibration tokens:\n")
        print(markdown(_fill(rows)))


def embedding_drift(model, tokenizer, max_tokens: int):
    """A scorer: how far a pruned copy's mean-pooled embeddings of the validation text (windows of
    SEQ_LEN tokens) move from the dense model's, as 100 x (1 - mean cosine)."""
    ids = encode(tokenizer, split_wiki_calib()[1])[: max_tokens // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)

    @torch.inference_mode()
    def pooled(m) -> torch.Tensor:
        return torch.cat([m.base_model(input_ids=b, attention_mask=torch.ones_like(b)).last_hidden_state.mean(1)
                          for b in ids.split(8)])

    dense = pooled(model)
    return lambda m: float(100 * (1 - torch.nn.functional.cosine_similarity(pooled(m), dense, dim=-1).mean()))


def _fill(rows: list[dict]) -> list[dict]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k, "") for k in keys} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=["options", "sizes", "sequential", "report", "encoder", "transfer"])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--sizes", default="64,128,256,512,1024")
    parser.add_argument("--budgets", default=None)
    parser.add_argument("--variants", default=None)
    parser.add_argument("--allocation", default="global", choices=["global", "uniform"])
    parser.add_argument("--max-tokens", type=int, default=8192, help="validation tokens (study)")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    default_budgets = {"report": "0.9,0.8,0.7,0.6,0.5", "transfer": "0.9,0.8,0.7,0.6,0.5", "encoder": "0.7,0.5"}.get(args.study, "0.9,0.7,0.5")
    args.budgets = [float(b) for b in (args.budgets or default_budgets).split(",")]
    encoder_variants = ["today's default", "ridge 0.3", "ridge auto", "held-out costs", "ridge 0.3 + held-out costs",
                        "ridge auto + held-out costs"]
    default_variants = {"options": list(VARIANTS), "encoder": encoder_variants}.get(
        args.study, ["today's default", "ridge auto + held-out costs"])
    args.variants = args.variants.split(";") if args.variants else default_variants
    {"options": options, "sizes": sizes, "sequential": sequential, "report": report, "encoder": encoder,
     "transfer": transfer}[args.study](args)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
