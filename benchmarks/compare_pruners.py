"""Every pruner under the same FLOPs budget on the embedded SmolLM2-135M: held-out perplexity and
pruning time, as a markdown table.

Each job is exactly what a user runs: the Hydra config composed with overrides, then
`stat_exp.pipeline.run_pipeline` (calibration 64 x 256 tokens of wiki_calib, perplexity on
wiki_eval at seq_len 256 and 16384 tokens). Every job's results.json lands under --out.

    python -m benchmarks.compare_pruners [--flops 0.9 0.7 0.5] [--pruners stat wanda_sp ...] [--variants params]
                                         [--set key=value ...] [--all key=value ...]

SliceGPT narrows the residual stream and adds shortcut matrices, so it trades FLOPs and parameters
differently from unit pruning: besides equal kept FLOPs it also runs at equal kept prunable
parameters (`pruner.match=params`, row "slicegpt (equal params)"); the table shows both fractions.

`--set` adds overrides to every job (e.g. `--pruners kwon --set pruner.fisher_examples=64`: Kwon et al.'s
Fisher information from 64 examples instead of their 2,048, which take about an hour of gradients here).
Kwon et al.'s gradients do not depend on the budget: its jobs share them through `pruner.fisher_cache`
in --out, so the first kwon job's prune time includes the gradient pass and the others' do not.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import report_table, run_job, save_table
from stat_exp.track.results import RunRecord

PRUNERS = ["stat", "stat_nocorr", "magnitude_sp", "wanda_sp", "flap", "kwon", "random", "slicegpt", "block_drop"]
# Extra rows per pruner (label, overrides): STAT's default is global, its uniform rows show what the
# allocation adds; SliceGPT also at equal parameters.
VARIANTS = {"stat": [("uniform", ("budget.allocation=uniform",))],
            "slicegpt": [("params", ("pruner.match=params",))]}
SETTINGS = ["model=smollm2_135m", "calib.source=wiki_calib", "calib.num_examples=64", "calib.seq_len=256",
            "eval=perplexity", "eval.perplexity.text_file=null", "eval.perplexity.seq_len=256", "eval.perplexity.max_tokens=16384",
            "budget.seq_len=256", "logger=none", "progress=false"]


Job = tuple[str, str | None, tuple[str, ...], float]  # pruner, variant label, its overrides, kept fraction


def jobs(pruners: list[str], flops: list[float], variants: list[str] | None = None) -> list[Job]:
    """Dense once, then per budget every pruner as configured (wanda_sp, magnitude_sp and random fix
    a uniform allocation, as published) and its VARIANTS (those labelled in `variants`; None: all)."""
    out: list[Job] = [("none", None, (), 1.0)]
    for f in flops:
        out += [(p, None, (), f) for p in pruners]
        out += [(p, label, overrides, f) for p in pruners for label, overrides in VARIANTS.get(p, [])
                if variants is None or label in variants]
    return out


def run(pruner: str, label: str | None, overrides: tuple[str, ...], flops: float, out: Path,
        extra: Sequence[str] = (), every: Sequence[str] = ()) -> RunRecord | str:
    job = [*SETTINGS, *every, f"pruner={pruner}", f"budget.flops={flops}", *overrides,
           *(extra if pruner != "none" else [])]
    job += [f"pruner.fisher_cache={(out / 'kwon_fisher.pt').resolve()}"] if pruner == "kwon" else []
    return run_job(job, out / f"{pruner}_{label or 'default'}_{flops}")


def row(pruner: str, label: str | None, overrides: tuple[str, ...], flops: float, result: RunRecord | str) -> str:
    if isinstance(result, str):
        return f"| {pruner} {label or ''} | {flops} | - | - | failed: {result} | - | - |"
    ppl = next((v for k, v in result.metrics.items() if k.endswith("/ppl")), float("nan"))
    seconds = [result.timing_s.get(k, 0.0) for k in ("calibrate", "prune")]
    return (f"| {result.pruner + (f' ({result.variant})' if result.variant else '')} | {flops} | "
            f"{result.achieved['flops_fraction']:.3f} | {result.achieved['params_fraction']:.3f} | {ppl:.1f} | "
            f"{seconds[0]:.0f} | {seconds[1]:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--pruners", nargs="+", default=PRUNERS)
    parser.add_argument("--variants", nargs="*", default=None, metavar="LABEL",
                        help="extra rows to run, by label (uniform, params); default: all, none when given empty")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every pruned job")
    parser.add_argument("--all", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for every job, the dense one included (e.g. a shorter evaluation)")
    parser.add_argument("--out", type=Path,
                        default=Path("outputs/bench") / time.strftime("compare_pruners_%Y-%m-%d_%H-%M-%S"))
    args = parser.parse_args()
    lines = ["| pruner | target | kept FLOPs | kept params | wiki_eval ppl | calibrate (s) | prune (s) |",
             "|---|---|---|---|---|---|---|"]
    for job in jobs(args.pruners, args.flops, args.variants):
        lines.append(row(*job, run(*job, args.out, args.set, args.all)))
        print(lines[-1], flush=True)
    note = ("SmolLM2-135M; calibration 64 x 256 tokens of wiki_calib, perplexity on 16,384 wiki_eval tokens in "
            "windows of 256, FLOPs at 256 tokens (unless the command's --set / --all change them). calibrate: "
            "calibration data and the layer stream; prune: scoring, search and surgery (kwon: also its gradient "
            "pass, in its first job only).")
    report_table("compare_pruners", save_table(lines, args.out, "compare_pruners"), note)
    print(f"Runs in {args.out}")


if __name__ == "__main__":
    main()
