"""STAT's quality options on SmolLM2: chosen on held-out text, reported on wiki_eval.

    python -m benchmarks.stat_quality options  [--examples 64] [--variants ...] [--budgets 0.7,0.5]
    python -m benchmarks.stat_quality sizes    [--sizes 64,128,256,512,1024] [--variants ...]
    python -m benchmarks.stat_quality sequential [--examples 64] [--variants ...] [--budgets 0.9,0.7,0.5]
    python -m benchmarks.stat_quality report   [--examples 128] [--budgets 0.9,0.8,0.7,0.6,0.5]
    python -m benchmarks.stat_quality encoder  [--variants ...] [--budgets 0.7,0.5] [--allocation uniform]
    python -m benchmarks.stat_quality transfer [--examples 128] [--budgets 0.9,0.7,0.5] [--held-out 16] [--max-tokens 4096] [--models smollm2_135m,minilm_l6] [--methods STAT,stat_heldout] [--baselines FLAP,Wanda-sp]
    python -m benchmarks.stat_quality propagation [--examples 256] [--budgets 0.9,0.7,0.5] [--held-out 8] [--models ...]
    python -m benchmarks.stat_quality selection_time [--examples 256] [--held-out 16] [--budgets 0.7]
    python -m benchmarks.stat_quality kinds [--examples 256] [--scales 0.25,0.5,1,2,4] [--models ...]

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
from dataclasses import replace
import time
from contextlib import nullcontext

import numpy as np
import torch

from benchmarks.common import CPU, markdown, record_result, report_table, smollm2
from benchmarks.held_out import (BATCH, SEQ_LEN, TAIL_ARTICLES, Statistics, calibration_and_held_out, calibration_batches,
                                 split_wiki_calib, validation_ppl)
from stat_exp.data.text import encode, load_text
from stat_exp.eval.perplexity import perplexity
from stat_exp.factorize import GramBackend
from stat_exp.models import get_adapter
from stat_exp.models.flops import FlopsModel, shapes_of
from stat_exp.models.loading import load_model
from stat_exp.prune.budget import BudgetSpec, allocate
from stat_exp.prune.flap import FlapPruner
from stat_exp.prune.plan_selection import OUTPUT_PRICED, candidate_plans, choose_plan
from stat_exp.prune.sensitivity import output_sensitivity
from stat_exp.prune.runner import PruneRunner
from stat_exp.prune.stat import StatPruner
from stat_exp.prune.wanda import WandaPruner

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
              "compensate (propagate pruned, dense targets)": ({"compensate": True}, "pruned"),
              "compensate, ridge 0.3": ({"compensate": True, "ridge": 0.3}, "pruned"),
              "compensate, ridge 1": ({"compensate": True, "ridge": 1.0}, "pruned")}


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
    report_table("stat_quality_options", _fill(rows),
                 f"Validation perplexity (last {args.max_tokens} tokens rule: first {args.max_tokens} of the held-out "
                 f"articles), {args.examples} x 256 calibration tokens, allocation {args.allocation}:")


def sizes(args) -> None:
    model, tok = load_model("smollm2_135m")
    stats = Statistics(model)
    batches = calibration_batches(tok, max(args.sizes))
    rows, done = [], 0
    for size in args.sizes:
        stats.grow(batches[done // BATCH: size // BATCH])
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
    report_table("stat_quality_sizes", rows,
                 f"Validation perplexity by calibration size ({args.max_tokens} validation tokens):")


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
    for name in args.variants:
        kwargs, propagate = SEQUENTIAL[name]
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
    report_table("stat_quality_sequential", rows,
                 f"Validation perplexity, {args.examples} x 256 calibration tokens, global allocation:")


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
    report_table("stat_quality_report", _fill(rows),
                 f"wiki_eval perplexity (16,384 tokens), {args.examples} x 256 calibration tokens of wiki_calib:")


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
    report_table("stat_quality_encoder", _fill(rows),
                 f"MiniLM polarity, held-out accuracy (50 sentences), calibrated on its 150 training sentences, "
                 f"allocation {args.allocation}:")


def transfer(args) -> None:
    """One table per real model: STAT's default (the plan chosen on held-out calibration batches)
    against STAT uniform, STAT's global plan as it was (select=off), stat_heldout (also choosing),
    FLAP and Wanda-sp, on the validation text and on another domain's text (`crime`), with the plan
    the default picked and its held-out KL against uniform's. One stream of statistics per model."""
    note = (f"Texts: validation (wiki_calib's last {TAIL_ARTICLES} articles, never calibrated on), crime (another "
            "domain's text), wiki_eval (decoders). \"STAT default\" is the plan STAT applies (chosen on held-out "
            "calibration batches); \"global (select=off)\" the global plan applied without the choice; \"picked\" "
            "the plan the choice took, with its held-out divergence against uniform's (KL to the dense model; the "
            "relative squared error of the last hidden states where a model has no logits); choose (s): STAT's "
            "choice.")
    tables = []
    for name in args.models:
        decoder = name.startswith("smollm2")
        model, tok = load_model(name, "causal_lm" if decoder else "encoder")  # the encoder without a (random) head
        stats = Statistics(model)
        batches, held_out = calibration_and_held_out(tok, args.examples, args.held_out)
        stats.grow(batches)
        scorers = _scorers(model, tok, decoder, args.max_tokens)
        dense = {t: f(model) for t, f in scorers.items()}
        print(name, "dense", dense, flush=True)
        methods = {m: p for m, p in {"STAT": StatPruner(**DEFAULT), "stat_heldout": StatPruner(**RECOMMENDED)}.items()
                   if m in args.methods.split(",")}
        scored = {m: stats.scored(p) for m, p in methods.items()}
        baselines = {m: p for m, p in {"FLAP": FlapPruner(), "Wanda-sp": WandaPruner(allocation="uniform")}.items()
                     if m in args.baselines.split(",")}
        layers = stats.adapter.layers()
        weights = output_sensitivity(model, stats.adapter, held_out, lambda i: nullcontext(layers[i]), CPU, CPU)
        base_scored = {m: stats.scored(p) for m, p in baselines.items()}
        shapes = shapes_of(stats.adapter)
        rows = []
        for target in args.budgets:
            budget = BudgetSpec(target, 256)
            models: dict[str, object] = {}
            picked = {}
            for method, pruner in methods.items():
                candidates = candidate_plans([sc for sc, _ in scored[method]], shapes, FLOPS, budget)
                start = time.perf_counter()
                choice = choose_plan(candidates, _blocks(stats, scored[method]), model, stats.adapter, held_out, CPU,
                                     CPU, pruner.apply)
                picked[method] = (choice, time.perf_counter() - start)
                wanted = {"uniform": "uniform", "global (select=off)": "global", "default": choice.chosen}
                priced = candidate_plans([sc for sc, _ in scored[method]], shapes, FLOPS, budget, weights)
                if OUTPUT_PRICED in priced:  # budget.select=output_priced's extra candidate (absent: it repeats a plan)
                    candidates[OUTPUT_PRICED] = priced[OUTPUT_PRICED]
                    wanted["output-priced"] = OUTPUT_PRICED
                if method == "stat_heldout":
                    wanted = {"default": choice.chosen}
                built: dict[str, object] = {}
                for label_, plan_name in wanted.items():
                    if plan_name not in built:
                        built[plan_name] = _pruned(model, pruner, scored[method], candidates[plan_name])
                    models[f"{method} {label_}"] = built[plan_name]
            for method, pruner in baselines.items():
                scores = [sc for sc, _ in base_scored[method]]
                plans = pruner.fixed_plans(list(range(len(scores))), scores, shapes, FLOPS, budget) or allocate(
                    scores, shapes, FLOPS, target, pruner.allocation_under("global"))
                models[method] = _pruned(model, pruner, base_scored[method], plans)
            for text, score in scorers.items():
                row = {"model": name, "text": text, "kept FLOPs": target}
                cache: dict[int, float] = {}
                for label_, m in models.items():
                    if id(m) not in cache:
                        cache[id(m)] = score(m)
                    row[label_] = cache[id(m)]
                for method, (choice, seconds) in picked.items():
                    row[f"{method} picked"] = choice.chosen
                    row[f"{method} lowest (SE vs uniform)"] = f"{choice.best} ({choice.t_vs_uniform:.1f})"
                    row[f"{method} held-out divergence: picked / uniform"] = (
                        f"{choice.scores[choice.chosen]:.4g} / {choice.scores['uniform']:.4g}")
                row["choose (s)"] = next(iter(picked.values()))[1]
                rows.append(row)
                print(row, flush=True)
        tables.append(f"{_heading(name, decoder, dense, args)}:\n\n{markdown(_fill(rows))}")
        print(f"\n{tables[-1]}", flush=True)
        # every model's table so far: a run stopped on a later model keeps the finished ones
        path = record_result("stat_quality_transfer", "\n\n".join(tables), note)
        print(f"written to {path}", flush=True)


def _scorers(model, tok, decoder: bool, max_tokens: int) -> dict:
    """{text: score(pruned model)}: perplexity on the validation text, `crime` and wiki_eval for a
    decoder; for an encoder, the embedding drift on the first two."""
    texts = {"validation": split_wiki_calib()[1], "crime": load_text("crime")}
    if not decoder:
        return {t: embedding_drift(model, tok, max_tokens, text) for t, text in texts.items()}
    texts["wiki_eval"] = load_text("wiki_eval")
    return {t: (lambda m, text=text: perplexity(m, tok, text, seq_len=SEQ_LEN, max_tokens=max_tokens, batch_size=8,
                                                progress=False)["ppl"]) for t, text in texts.items()}


def _heading(name: str, decoder: bool, dense: dict, args) -> str:
    """What a model's table measures: the score, the dense model's, calibration and held-out sizes."""
    return (f"{name}: {'perplexity' if decoder else 'embedding drift, 100 x (1 - cosine to dense)'} "
            f"(dense: {', '.join(f'{t} {v:.3g}' for t, v in dense.items())}), {args.examples} x {SEQ_LEN} "
            f"calibration tokens, {args.held_out} held-out sequences for the choice, {args.max_tokens} "
            f"tokens scored per text")


def propagation(args) -> None:
    """STAT's default (plan chosen on held-out batches) as whole jobs, with blocks fitted on the dense
    stream (today) and on the pruned model's own stream (calib.propagate=pruned), per real model and
    budget: the scores on each text, the plan each picked, and the prune time of each (side by side,
    one process, so the ratio is what it costs)."""
    tables = []
    for name in args.models:
        decoder = name.startswith("smollm2")
        model, tok = load_model(name, "causal_lm" if decoder else "encoder")
        batches, held_out = calibration_and_held_out(tok, args.examples, args.held_out)
        scorers = _scorers(model, tok, decoder, args.max_tokens)
        dense = {t: f(model) for t, f in scorers.items()}
        rows = []
        for target in args.budgets:
            jobs = {}
            for propagate in ("dense", "pruned"):
                pruned = copy.deepcopy(model)
                runner = PruneRunner(StatPruner(), BudgetSpec(target, SEQ_LEN, held_out_examples=args.held_out),
                                     GramBackend(), propagate, progress=False)
                start = time.perf_counter()
                out = runner.run(pruned, get_adapter(pruned), batches, CPU, held_out=held_out)
                jobs[propagate] = (pruned, time.perf_counter() - start, out.allocation["chosen"])
            for text, score in scorers.items():
                row = {"model": name, "text": text, "kept FLOPs": target}
                for propagate, (pruned, _, _) in jobs.items():
                    row[f"propagate={propagate}"] = score(pruned)
                row["pruned / dense"] = row["propagate=pruned"] / row["propagate=dense"]
                row["picked (dense / pruned)"] = f"{jobs['dense'][2]} / {jobs['pruned'][2]}"
                row["prune (s), dense / pruned"] = f"{jobs['dense'][1]:.0f} / {jobs['pruned'][1]:.0f}"
                row["time ratio"] = jobs["pruned"][1] / jobs["dense"][1]
                rows.append(row)
                print(row, flush=True)
        tables.append(f"{_heading(name, decoder, dense, args)}, torch threads {torch.get_num_threads()}:\n\n"
                      f"{markdown(rows)}")
        path = record_result("stat_quality_propagation", "\n\n".join(tables),
                             "Whole STAT jobs (gram backend, global allocation chosen on held-out calibration "
                             "batches), calib.propagate=dense (the default) against pruned; lower is better; "
                             "prune (s) includes streaming the calibration set.")
        print(f"written to {path}", flush=True)


def _blocks(stats: Statistics, scored):
    return ((i, layer, sc, st) for (i, layer), (sc, st) in zip(enumerate(stats.adapter.layers()), scored))


def _pruned(model, pruner, scored, plans):
    pruned = copy.deepcopy(model)
    PruneRunner(pruner, BudgetSpec(seq_len=256), None, progress=False).apply_plans(get_adapter(pruned), scored, plans)
    return pruned


def selection_time(args) -> None:
    """What choosing the plan adds to STAT's prune time, from one default job per budget: its prune
    time (wall and this process's CPU time, streaming included) against the same job without the
    choice (everything else in the job is the select=off path, step for step)."""
    from stat_exp.data.calibration import TextCalibration

    model, tok = load_model("smollm2_135m")
    calibration = TextCalibration("wiki_calib", args.examples, 256)
    batches, held_out = calibration.batches(tok), calibration.held_out_batches(tok, args.held_out, args.examples)
    rows = []
    for target in args.budgets:
        pruned = copy.deepcopy(model)
        runner = PruneRunner(StatPruner(), BudgetSpec(target, 256, held_out_examples=args.held_out), GramBackend(),
                             progress=False)
        wall, cpu = time.perf_counter(), time.process_time()
        out = runner.run(pruned, get_adapter(pruned), batches, CPU, held_out=held_out)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        choice = out.allocation
        row = {"kept FLOPs": target, "prune (s)": wall, "of which choosing (s)": choice["seconds"],
               "ratio to select=off (wall)": wall / (wall - choice["seconds"]),
               "prune CPU (s)": cpu, "of which choosing CPU (s)": choice["cpu_seconds"],
               "ratio to select=off (CPU)": cpu / (cpu - choice["cpu_seconds"]), "chosen": choice["chosen"],
               "held-out KL": "; ".join(f"{k} {v:.4f}" for k, v in choice["held_out"].items())}
        rows.append(row)
        print(row, flush=True)
    report_table("stat_quality_selection_time", _fill(rows),
                 f"SmolLM2-135M, {args.examples} x 256 calibration tokens, {args.held_out} held-out sequences, "
                 f"torch threads {torch.get_num_threads()}:")


def steps(args) -> None:
    """STAT's default reaching each budget in k equal steps (kept fraction b^(1/k) of the model as
    pruned so far), every step calibrated again on the model the last one left (what `model.source`
    does between jobs, here in one process): whether recalibrating between smaller steps gains
    what one step leaves, and what it costs."""
    model, tok = load_model("smollm2_135m")
    batches, held_out = calibration_and_held_out(tok, args.examples, args.held_out)
    scorers = _scorers(model, tok, True, args.max_tokens)
    rows = []
    for target in args.budgets:
        for k in args.steps:
            pruned, chosen = copy.deepcopy(model), []
            start = time.perf_counter()
            for _ in range(k):
                runner = PruneRunner(StatPruner(), BudgetSpec(target ** (1 / k), SEQ_LEN, held_out_examples=args.held_out),
                                     GramBackend(), progress=False)
                chosen.append(runner.run(pruned, get_adapter(pruned), batches, CPU, held_out=held_out).allocation["chosen"])
            row = {"kept FLOPs": target, "steps": k, "prune (s)": time.perf_counter() - start,
                   "picked": " / ".join(chosen)}
            row.update({text: score(pruned) for text, score in scorers.items()})
            rows.append(row)
            print(row, flush=True)
    report_table("stat_quality_steps", _fill(rows),
                 f"SmolLM2-135M, STAT default, {args.examples} x {SEQ_LEN} calibration tokens (the same every step), "
                 f"{args.held_out} held-out sequences, perplexity on {args.max_tokens} tokens per text, "
                 f"torch threads {torch.get_num_threads()}:")


def kinds(args) -> None:
    """The split between the kinds: STAT's global plan with every head's price scaled by s against
    the neurons' (s > 1 keeps more heads and fewer neurons, s = 1 is the global plan), scored on
    each text. Whether a per-kind split would earn a place among the plan choice's candidates."""
    rows = []
    for name in args.models:
        decoder = name.startswith("smollm2")
        model, tok = load_model(name, "causal_lm" if decoder else "encoder")
        stats = Statistics(model)
        stats.grow(calibration_batches(tok, args.examples))
        scorers = _scorers(model, tok, decoder, args.max_tokens)
        pruner = StatPruner(**DEFAULT)
        scored = stats.scored(pruner)
        shapes = shapes_of(stats.adapter)
        for target in args.budgets:
            for scale in args.scales:
                scaled = [replace(sc, attn_cost=sc.attn_cost * scale) for sc, _ in scored]
                plans = allocate(scaled, shapes, FLOPS, target, "global")
                pruned = _pruned(model, pruner, scored, plans)
                heads = sum(len(sc.attn_levels[p.attn_level].heads) for (sc, _), p in zip(scored, plans))
                row = {"model": name, "kept FLOPs": target, "head price x": scale,
                       "heads kept": heads, "neurons kept": sum(p.neurons for p in plans)}
                row.update({text: score(pruned) for text, score in scorers.items()})
                rows.append(row)
                print(row, flush=True)
    report_table("stat_quality_kinds", _fill(rows),
                 f"STAT default's global plan with head prices scaled against neuron prices, {args.examples} x "
                 f"{SEQ_LEN} calibration tokens, {args.max_tokens} tokens scored per text (perplexity; embedding "
                 f"drift for an encoder):")


def embedding_drift(model, tokenizer, max_tokens: int, text: str | None = None):
    """A scorer: how far a pruned copy's mean-pooled embeddings of a text (the validation text unless
    given; windows of SEQ_LEN tokens, or one shorter window) move from the dense model's, as
    100 x (1 - mean cosine)."""
    ids = encode(tokenizer, split_wiki_calib()[1] if text is None else text)[:max_tokens]
    ids = ids[: max(1, len(ids) // SEQ_LEN) * SEQ_LEN].view(-1, min(SEQ_LEN, len(ids)))

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
    parser.add_argument("study", choices=["options", "sizes", "sequential", "report", "encoder", "transfer",
                                          "propagation", "selection_time", "steps", "kinds"])
    parser.add_argument("--held-out", type=int, default=16, help="held-out sequences for choosing the plan")
    parser.add_argument("--models", default="smollm2_135m,minilm_l6", help="transfer: the real models")
    parser.add_argument("--methods", default="STAT,stat_heldout", help="transfer: STAT variants (STAT, stat_heldout)")
    parser.add_argument("--baselines", default="FLAP,Wanda-sp", help="transfer: baselines (FLAP, Wanda-sp; '' for none)")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--sizes", default="64,128,256,512,1024")
    parser.add_argument("--budgets", default=None)
    parser.add_argument("--variants", default=None)
    parser.add_argument("--allocation", default="global", choices=["global", "uniform"])
    parser.add_argument("--max-tokens", type=int, default=8192, help="validation tokens (study)")
    parser.add_argument("--steps", default="1,2,3", help="steps: the step counts compared")
    parser.add_argument("--scales", default="0.25,0.5,1,2,4", help="kinds: head price multipliers")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.models = args.models.split(",")
    args.steps = [int(k) for k in args.steps.split(",")]
    args.scales = [float(x) for x in args.scales.split(",")]
    default_budgets = {"report": "0.9,0.8,0.7,0.6,0.5", "transfer": "0.9,0.7,0.5", "encoder": "0.7,0.5"}.get(args.study, "0.9,0.7,0.5")
    args.budgets = [float(b) for b in (args.budgets or default_budgets).split(",")]
    encoder_variants = ["today's default", "ridge 0.3", "ridge auto", "held-out costs", "ridge 0.3 + held-out costs",
                        "ridge auto + held-out costs"]
    default_variants = {"options": list(VARIANTS), "encoder": encoder_variants, "sequential": list(SEQUENTIAL)[:3]}.get(
        args.study, ["today's default", "ridge auto + held-out costs"])
    args.variants = args.variants.split(";") if args.variants else default_variants
    {"options": options, "sizes": sizes, "sequential": sequential, "report": report, "encoder": encoder,
     "transfer": transfer, "propagation": propagation, "selection_time": selection_time, "steps": steps,
     "kinds": kinds}[args.study](args)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
