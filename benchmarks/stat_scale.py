"""Scale on the CPU: memory per block, the planner against measured peaks and times, and
calibrate + prune against one dense forward pass, on randomly initialised Llamas with Llama-2-7B
block shapes; and the embedded SmolLM2 in several variants side by side.

    python -m benchmarks.stat_scale [--depths 2 3 4] [--sequences 44 [176 ...]] [--modes cpu/spill/dense ...]
    python -m benchmarks.stat_scale --embedded [VARIANT ...] [--sequences 16]   # SmolLM2 STAT 0.7, see VARIANTS

Models with hidden 4096, FFN 11008 and 32 heads (Llama-2-7B's blocks) and `depth` blocks are
saved to a local folder (fp32, tied embeddings, MiniLM's 30,522-token vocabulary) and pruned by
ordinary jobs (`model.source=<folder>`, STAT, global allocation, budget 0.5, block-at-a-time
stream), each in its own process so its peak RSS is its own, in the modes offload/factors/propagate
asked for. In the same run, a dense forward pass over the same calibration set is timed on each
model before the jobs and after them (the faster of the two counts: a single pass varied 20% between
runs on a quiet machine), and each phase (calibrate, prune) is reported as a multiple of it, next to the planner's
seconds for that phase; `cpu/spill/dense/off` is the same job without the plan choice
(`budget.select=off`), so its cost on these shapes is measured too (issue 22: <= 1.2x). Checks:
peak host memory per extra block <= 1.25x the block's weight bytes with weights on the host and
about 0 with `offload=disk` (issue 10); the planner's peak within 20% of the measured one;
(calibrate + prune) / forward <= 1.2 and propagate=pruned <= 1.3x dense (issue 23). With two or
more `--sequences`, each job's calibrate + prune and the forward are fitted as straight lines in the
calibration size and read at the size `calib.num_examples=auto` asks of these blocks: the fixed
O(m^3) work of an 11,008-wide FFN dominates at 44 sequences and not at the default size, which this
CPU cannot run in a session (printed as an extrapolation, not a measurement).
`--embedded`: the same model out from the CPU and the accelerators' factorization paths and from
float32 and float64 Gram tiles (structure, perplexity), and each variant's time against the forward.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import MEASURED_AT, report_table

OUT = Path("outputs/benchmarks/stat_scale")
HIDDEN, FFN, HEADS = 4096, 11008, 32
# offload/factors/propagate[/select]: the last, budget.select, is held_out (the default) unless given
MODES = ["cpu/spill/dense", "cpu/recompute/dense", "disk/spill/dense", "cpu/spill/pruned", "cpu/spill/dense/off"]


def build(depth: int) -> Path:
    """A random Llama with Llama-2-7B blocks and MiniLM's tokenizer, saved once."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stat_exp.assets import model_path

    folder = OUT / f"llama7b_blocks_{depth}"
    if (folder / "config.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm_l6"))
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, num_hidden_layers=depth, vocab_size=len(tokenizer),
                         tie_word_embeddings=True, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def overrides(folder: Path, sequences: int) -> list[str]:
    return [f"model.source={folder.resolve()}", f"model.name={folder.name}", "model.dtype=float32",
            "calib.source=wiki_calib", f"calib.num_examples={sequences}", "calib.seq_len=256", "calib.batch_size=8",
            "budget.flops=0.5", "budget.seq_len=256", "pruner=stat", "factorization=gram", "eval=perplexity",
            "eval.perplexity.max_tokens=512", "eval.perplexity.batch_size=1", "logger=none", "progress=false",
            "device=cpu", "execution.stream=block", "resume=true"]  # a finished job (see job) is not run again


def run_dir(name: str, sequences: int) -> Path:
    """A job's folder, per code version too: resume matches configs only, and a folder from an
    earlier commit would hand back that code's timings."""
    code = MEASURED_AT.split()[0] + ("-dirty" if "uncommitted" in MEASURED_AT else "")
    return OUT / f"{name}_{sequences}x256_{code}"


def job(depth: int, mode: str, sequences: int) -> dict:
    """One ordinary run, in this process (called through a subprocess by main)."""
    from benchmarks.common import run_job

    folder = build(depth)
    offload, factors, propagate, *select = mode.split("/")
    record = run_job([*overrides(folder, sequences), f"execution.offload={offload}", f"execution.factors={factors}",
                      f"calib.propagate={propagate}", f"budget.select={select[0] if select else 'held_out'}"],
                     run_dir(f"run_{depth}_{mode.replace('/', '_')}", sequences))
    if isinstance(record, str):
        return {"error": record}
    return {"peak_rss_mb": record.peak_rss_mb, "plan": record.plan, "timing_s": record.timing_s,
            "achieved": record.achieved["flops_fraction"], "execution": record.execution}


def forward(depth: int, sequences: int) -> dict:
    """Seconds of one dense forward pass over the calibration set (the model resident)."""
    from stat_exp.data.calibration import calibration_batches
    from stat_exp.models.loading import load_model

    model, tokenizer = load_model(str(build(depth).resolve()), "causal_lm", "float32", "cpu")
    batches = calibration_batches(tokenizer, "wiki_calib", sequences, 256, 0, 8)
    start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            model(**b, use_cache=False)
    return {"forward_s": time.perf_counter() - start}


EMBEDDED = ["model=smollm2_135m", "pruner=stat", "budget.flops=0.7", "calib.seq_len=256", "calib.batch_size=8",
            "eval=perplexity", "eval.perplexity.max_tokens=2048", "logger=none", "progress=false", "device=cpu",
            "resume=true"]
# name -> overrides on top of EMBEDDED; the first is the reference the others are compared with
VARIANTS = {
    "lapack": [],  # the CPU path: LAPACK's pivoted Cholesky, float32 Gram tiles summed in float64
    "blocked": ["factorization.pivoting=blocked"],  # the accelerators' torch factorization, run on the CPU
    "float64_gram": ["factorization.block_dtype=float64"],
    "global_pruned": ["calib.propagate=pruned"],
    "global_off": ["budget.select=off"],  # the global plan without the choice among candidates (issue 22: <= 1.2x)
    "uniform_dense": ["budget.allocation=uniform"],
    "uniform_pruned": ["budget.allocation=uniform", "calib.propagate=pruned"],
    "bounded": ["execution.offload=disk", "execution.stream=block", "execution.factors=spill"],
}
DEFAULT_VARIANTS = ["lapack", "blocked", "float64_gram", "global_pruned", "uniform_dense", "uniform_pruned"]


def embedded_forward(sequences: int) -> float:
    """Seconds of one dense forward pass of SmolLM2 over the embedded runs' calibration set."""
    from benchmarks.common import smollm2

    model, _, batches = smollm2(sequences, 256, 8)
    start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            model(**b, use_cache=False)
    return time.perf_counter() - start


def embedded(names: list[str], sequences: int) -> str:
    """STAT at 0.7 on SmolLM2 in several variants, side by side in this process, next to one dense
    forward pass over the same calibration set: the same model out (structure, perplexity) from
    every factorization path and Gram precision, and the time of each against the forward pass."""
    from benchmarks.common import run_job

    before = embedded_forward(sequences)
    runs = [(name, run_job([*EMBEDDED, f"calib.num_examples={sequences}", *VARIANTS[name]],
                           run_dir(f"embedded_{name}", sequences))) for name in names]
    after = embedded_forward(sequences)
    forward_s = min(before, after)  # the pass's cost less the machine's noise (it varied 125-150 s between runs)
    ref_name, ref = runs[0]
    if isinstance(ref, str):
        return f"failed: {ref}"
    ppl_ref = ref.metrics["perplexity/ppl"]
    lines = [f"SmolLM2-135M, STAT 0.7, {sequences} x 256 calibration tokens, 2,048 evaluation tokens, CPU; one dense forward pass over the calibration set: "
             f"{forward_s:.1f} s (the faster of {before:.1f} s before the jobs and {after:.1f} s after them)", "",
             "| variant | overrides | wiki_eval ppl | vs " + ref_name + " | structure | calibrate (s) | prune (s) | "
             "(calibrate + prune) / forward |", "|---|---|---|---|---|---|---|---|"]
    work = {}
    for name, r in runs:
        if isinstance(r, str):
            lines.append(f"| {name} | {' '.join(VARIANTS[name])} | failed: {r} ||||||")
            continue
        ppl = r.metrics["perplexity/ppl"]
        work[name] = r.timing_s.get("calibrate", 0) + r.timing_s.get("prune", 0)
        same = "same" if r.structure == ref.structure else "differs"
        lines.append(f"| {name} | {' '.join(VARIANTS[name]) or '(default)'} | {ppl:.3f} | {(ppl / ppl_ref - 1) * 100:+.3f}% | "
                     f"{same} | {r.timing_s.get('calibrate', 0):.1f} | {r.timing_s.get('prune', 0):.1f} | "
                     f"{work[name] / forward_s:.2f} |")
    lines.append("")
    for pruned, dense in (("global_pruned", "lapack"), ("uniform_pruned", "uniform_dense"), ("lapack", "global_off")):
        if pruned in work and dense in work:
            lines.append(f"- {pruned} / {dense}: {work[pruned] / work[dense]:.2f}x the calibrate + prune time")
    return "\n".join(lines)


def _work(result: dict) -> float:
    """Calibrate + prune seconds of one job's result."""
    return result["timing_s"].get("calibrate", 0) + result["timing_s"].get("prune", 0)


def _row(depth: int, mode: str, sequences: int, r: dict, f: float) -> str:
    """One job's table row: memory against the plan, each phase against the dense forward pass."""
    if "error" in r:
        return f"| {depth} | {mode} | {sequences} | failed: {r['error']} ||||||||||"
    t = r["timing_s"]
    calib, prune = t.get("calibrate", 0), t.get("prune", 0)
    planned = r["plan"].get("phases_s", {})
    planned_prune = sum(v for k, v in planned.items() if k != "calibrate")
    return (f"| {depth} | {mode} | {sequences} | {r['peak_rss_mb']:,.0f} | {r['plan']['peak_host_mb']:,.0f} | "
            f"{r['plan']['peak_host_mb'] / r['peak_rss_mb']:.2f} | {calib:.0f} ({planned.get('calibrate', 0):.0f}) | "
            f"{prune:.0f} ({planned_prune:.0f}) | {f:.0f} | {calib / f:.2f} | {prune / f:.2f} | "
            f"**{(calib + prune) / f:.2f}** |")


def _extrapolated(results: dict, forwards: dict, depths: list[int], modes: list[str], sizes: list[int]) -> list[str]:
    """Each job's calibrate + prune and the forward as straight lines in the calibration size,
    through the smallest and the largest size measured, read at the size `calib.num_examples=auto`
    asks of a model with these blocks (an extrapolation, and said to be one)."""
    lo, hi = min(sizes), max(sizes)
    lines = []
    for depth in depths:
        f_lo, f_hi = forwards[depth, lo].get("forward_s"), forwards[depth, hi].get("forward_s")
        for mode in modes:
            a, b = results.get((depth, mode, lo), {}), results.get((depth, mode, hi), {})
            if not (f_lo and f_hi and "timing_s" in a and "timing_s" in b):
                continue
            calibration = b["plan"]["calibration"]
            auto = calibration["knee_tokens_per_unit"] * calibration["largest_rank"] / 256
            per_seq = (_work(b) - _work(a)) / (hi - lo)
            fixed = _work(a) - per_seq * lo
            forward_per_seq = (f_hi - f_lo) / (hi - lo)
            f_fixed = f_lo - forward_per_seq * lo
            lines.append(f"- {depth} blocks, {mode}: calibrate + prune = {fixed:.0f} s + {per_seq:.2f} s per sequence, "
                         f"the forward {f_fixed:.0f} s + {forward_per_seq:.2f} s per sequence; extrapolated to "
                         f"{auto:,.0f} x 256 tokens (calib.num_examples=auto for these blocks): (calibrate + prune) / "
                         f"forward = **{(fixed + per_seq * auto) / (f_fixed + forward_per_seq * auto):.2f}** (not measured)")
    return lines


def _subprocess(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.stat_scale", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 3, 4])
    # 44 x 256 = 11,264 tokens: more than the FFN width (11,008), so any kept neuron count can be corrected
    parser.add_argument("--sequences", type=int, nargs="+", default=None,
                        help="calibration sizes (default 44; 16 with --embedded, which takes the first); "
                             "with two or more, each job's time is also extrapolated")
    parser.add_argument("--one", nargs=2, metavar=("DEPTH", "OFFLOAD/FACTORS/PROPAGATE"))
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--forward", type=int, metavar="DEPTH")
    parser.add_argument("--embedded", nargs="*", metavar="VARIANT", choices=list(VARIANTS),
                        help=f"only the embedded model, these variants side by side (default: {' '.join(DEFAULT_VARIANTS)})")
    args = parser.parse_args()
    if args.embedded is not None:
        OUT.mkdir(parents=True, exist_ok=True)
        names = args.embedded or DEFAULT_VARIANTS
        table = embedded(names, (args.sequences or [16])[0])
        (OUT / f"embedded_{'_'.join(names)}.md").write_text(table + "\n")
        report_table("stat_scale_embedded", table)
        return
    args.sequences = args.sequences or [44]
    if args.one:
        print(json.dumps(job(int(args.one[0]), args.one[1], args.sequences[0])))
        return
    if args.forward:
        print(json.dumps(forward(args.forward, args.sequences[0])))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for depth in args.depths:
        build(depth)
    block_mb = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN) * 4 / 2**20
    rows, results, forwards = [], {}, {}
    for sequences in args.sequences:
        for depth in args.depths:
            timed = [_subprocess("--forward", str(depth), "--sequences", str(sequences))]
            jobs = {}
            for mode in args.modes:
                if "recompute" in mode and depth != min(args.depths):
                    continue
                jobs[mode] = results[depth, mode, sequences] = _subprocess("--one", str(depth), mode, "--sequences",
                                                                           str(sequences))
            timed.append(_subprocess("--forward", str(depth), "--sequences", str(sequences)))
            # the faster of a pass before the jobs and one after them: the pass's cost less the machine's noise
            fwd = forwards[depth, sequences] = min(timed, key=lambda t: t.get("forward_s", float("inf")))
            rows += [_row(depth, mode, sequences, r, fwd.get("forward_s", float("nan"))) for mode, r in jobs.items()]
    sizes = " and ".join(f"{n} x 256" for n in args.sequences)
    lines = [f"Llama-2-7B-shaped blocks ({block_mb:,.0f} MB each in fp32), {sizes} calibration tokens, "
             "STAT 0.5 global, CPU; planned seconds in brackets (the planner's time model):", "",
             "| blocks | offload/factors/propagate | sequences | peak RSS (MB) | planned (MB) | planned / measured | "
             "calibrate (s) | prune (s) | dense forward (s) | calibrate / forward | prune / forward | "
             "(calibrate + prune) / forward |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    first = args.sequences[0]
    lo, hi = min(args.depths), max(args.depths)
    for mode in args.modes:
        a, b = results.get((lo, mode, first), {}), results.get((hi, mode, first), {})
        if hi > lo and "peak_rss_mb" in a and "peak_rss_mb" in b:
            per_block = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (hi - lo)
            lines.append(f"- {mode}: peak grows {per_block:,.0f} MB per extra block "
                         f"= {per_block / block_mb:.2f}x the block's weights")
    for sequences in args.sequences:
        for depth in args.depths:
            a, b = results.get((depth, "cpu/spill/dense", sequences), {}), results.get((depth, "cpu/spill/pruned", sequences), {})
            c = results.get((depth, "cpu/spill/dense/off", sequences), {})
            at = f"{depth} blocks, {sequences} sequences"
            if "timing_s" in a and "timing_s" in b:
                lines.append(f"- {at}: propagate=pruned / propagate=dense = {_work(b) / _work(a):.2f}x")
            if "timing_s" in a and "timing_s" in c:
                lines.append(f"- {at}: the plan choice (select=held_out) / select=off = {_work(a) / _work(c):.2f}x")
    if len(args.sequences) > 1:
        lines += ["", *_extrapolated(results, forwards, args.depths, args.modes, args.sequences)]
    table = "\n".join(lines)
    (OUT / "stat_scale.md").write_text(table + "\n")
    report_table("stat_scale", table)


if __name__ == "__main__":
    main()
