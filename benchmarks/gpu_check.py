"""The CUDA path, checked on a GPU machine that has only its own Python, torch and transformers.

    python -m benchmarks.gpu_check            # on a machine with a GPU; one table, exit 1 on a parity failure

Needs, besides the package: torch and transformers (its smoke test, `--small`, passes with
transformers 4.48.3 and 5.23.0 on torch 2.13), numpy, safetensors and tqdm (transformers brings
them), and one pure-Python package to carry: `annotated-types`. scipy (with `threadpoolctl`) is used
when present, for LAPACK on the CPU side; without it the torch factorizations run there too. No
network, no model files: models are built from configs with random weights.

(a) Parity: a SmolLM2-135M-shaped Llama (30 blocks, 9 query / 3 KV heads, FFN 1536), STAT at 0.7
    of the FLOPs with `gram` and with `qr`, pruned on CUDA and on the CPU (LAPACK) from the same
    weights and calibration tokens: same per-layer structure, perplexity within 2%, achieved FLOPs
    within 0.01. Without a GPU (`--small`) the other side is the torch factorization loops every
    accelerator runs, on the CPU (stat_exp.factorize.base.without_lapack), so the smoke test still
    compares two different paths.
(b) Factorization: the pivoted Cholesky of an 11,008-wide Gram (Llama-2-7B's FFN) on the device,
    blocked (panels of 64 pivots, one matrix product per panel) against the column loop it
    replaced (panel=1) and LAPACK on the CPU: seconds, and the same pivots as LAPACK.
(c) Scale: a Llama-2-7B-shaped model (32 blocks, bf16) pruned by STAT to 0.5 of the FLOPs on 128
    sequences of 2048 tokens with the global allocation: seconds per phase and peak device memory,
    next to the planner's prediction for the same job.
Without a GPU it stops with one line (exit 2).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from stat_exp.factorize.base import without_lapack

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
PARITY_PPL_RTOL, PARITY_FLOPS_ATOL = 0.02, 0.01


def token_batches(n: int, seq_len: int, batch: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Seeded pseudo-text: Zipf-distributed token ids (a few frequent tokens, a long tail), so the
    activations have the uneven spectrum real text gives rather than a flat random one."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, n * seq_len, replacement=True, generator=g).view(n, seq_len)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(batch)]


def build(shape: dict, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=4096, **shape)
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def perplexity(model, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for b in batches:
            ids = b["input_ids"].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                           reduction="sum"))
            count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))


def prune(model, backend_name: str, device: torch.device, calib, flops: float, seq_len: int, plan=None) -> tuple:
    from stat_exp.factorize import GramBackend, QRBackend
    from stat_exp.models import get_adapter
    from stat_exp.prune.budget import BudgetSpec
    from stat_exp.prune.runner import PruneRunner
    from stat_exp.prune.stat import StatPruner

    backend = GramBackend(device, block_dtype="float64") if backend_name == "gram" else QRBackend(device)
    stream, factors = ("block", "hold") if plan is None else (plan.execution.stream, plan.execution.factors)
    runner = PruneRunner(StatPruner(), BudgetSpec(flops, seq_len, "global", 1), backend, progress=False,
                         stream=stream, factors=factors, spill_dir=None if factors != "spill" else _tmp("factors"))
    start = time.perf_counter()
    outcome = runner.run(model, get_adapter(model), calib, device)
    return outcome, time.perf_counter() - start


def _tmp(name: str):
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix=f"gpu_check_{name}_"))


def parity(small: bool) -> tuple[list[str], bool]:
    """(table rows, all passed)."""
    shape = dict(SMOLLM2, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, head_dim=16, vocab_size=512) if small else SMOLLM2
    seq_len = 64 if small else 256
    calib = token_batches(16, seq_len, 4, shape["vocab_size"], seed=1)
    held_out = token_batches(8, seq_len, 4, shape["vocab_size"], seed=2)
    base = build(shape, torch.float32, "cpu")
    rows, ok = [], True
    other = "cuda" if torch.cuda.is_available() else "cpu torch loops"
    for backend in ("gram", "qr"):
        results = {}
        for where in ("cpu", other):
            device = torch.device("cuda" if where == "cuda" else "cpu")
            model = build(shape, torch.float32, "cpu")
            model.load_state_dict(base.state_dict())
            model.to(device)
            with without_lapack() if where == "cpu torch loops" else contextlib.nullcontext():
                outcome, seconds = prune(model, backend, device, calib, 0.7, seq_len)
            results[where] = (outcome, perplexity(model, held_out, device), seconds)
        (a, ppl_a, t_a), (b, ppl_b, t_b) = results["cpu"], results[other]
        same = a.structure == b.structure
        close = abs(ppl_a - ppl_b) <= PARITY_PPL_RTOL * ppl_a
        flops = abs(a.achieved["flops_fraction"] - b.achieved["flops_fraction"]) <= PARITY_FLOPS_ATOL
        ok &= same and close and flops
        rows.append(f"| parity, {backend} | structure {'same' if same else 'DIFFERS'}; ppl cpu {ppl_a:.2f} vs {other} "
                    f"{ppl_b:.2f} ({(ppl_b / ppl_a - 1) * 100:+.2f}%); FLOPs {a.achieved['flops_fraction']:.4f} vs "
                    f"{b.achieved['flops_fraction']:.4f}; prune cpu {t_a:.1f} s, {other} {t_b:.1f} s | "
                    f"{'ok' if same and close and flops else 'FAIL'} |")
    return rows, ok


def factorization(small: bool) -> tuple[list[str], bool]:
    """(table row, same pivots as LAPACK) for the pivoted Cholesky on the device."""
    from stat_exp.factorize.base import _pivoted_cholesky_torch, pivoted_cholesky

    m = 256 if small else 11008
    device = torch.device(_gpu_or_cpu())
    g = torch.Generator().manual_seed(0)
    X = torch.randn(m + m // 4, m, generator=g, dtype=torch.float64) * torch.logspace(0, -3, m, dtype=torch.float64)
    G = X.T @ X
    seconds, perms = {}, {}
    for name, run in (("blocked", lambda A: _pivoted_cholesky_torch(A)),
                      ("column loop", lambda A: _pivoted_cholesky_torch(A, panel=1)),
                      ("LAPACK (CPU)", lambda A: pivoted_cholesky(A))):
        A = G if name.startswith("LAPACK") else G.to(device)
        _sync(device)
        start = time.perf_counter()
        perms[name] = run(A)[0].cpu()
        _sync(device)
        seconds[name] = time.perf_counter() - start
    same = all(torch.equal(p, perms["LAPACK (CPU)"]) for p in perms.values())
    times = ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
    return [f"| pivoted Cholesky, width {m}, on {device.type} | {times}; pivots "
            f"{'same as' if same else 'DIFFER from'} LAPACK's | {'ok' if same else 'FAIL'} |"], same


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpu_or_cpu() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def scale(small: bool) -> list[str]:
    """Seconds per phase and peak device memory of the 7B-shaped job, next to the plan."""
    from stat_exp.execution.choices import ExecutionSpec
    from stat_exp.execution.plan import Job, plan_job
    from stat_exp.factorize import GramBackend
    from stat_exp.prune.stat import StatPruner

    shape = dict(LLAMA2_7B, num_hidden_layers=2, hidden_size=64, intermediate_size=172, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512) if small else LLAMA2_7B
    sequences, seq_len, batch = (8, 64, 4) if small else (128, 2048, 4)
    device = torch.device(_gpu_or_cpu())
    with torch.device("meta"):
        meta = build(shape, torch.bfloat16, "meta")
    job = Job(meta, StatPruner(), GramBackend("cpu"), torch.bfloat16, sequences, seq_len, batch, eval_batch=1,
              eval_len=seq_len, kept=0.5)
    plan = plan_job(job, ExecutionSpec(), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = build(shape, torch.bfloat16, str(device))
    built = time.perf_counter() - start
    calib = token_batches(sequences, seq_len, batch, shape["vocab_size"], seed=1)
    from stat_exp.factorize import GramBackend as Gram
    from stat_exp.models import get_adapter
    from stat_exp.prune.budget import BudgetSpec
    from stat_exp.prune.runner import PruneRunner

    runner = PruneRunner(StatPruner(), BudgetSpec(0.5, seq_len, "global", 1), Gram(device), progress=not small,
                         stream=plan.execution.stream, factors=plan.execution.factors,
                         spill_dir=_tmp("factors") if plan.execution.factors == "spill" else None)
    start = time.perf_counter()
    outcome = runner.run(model, get_adapter(model), calib, device)
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    t = outcome.timing_s
    return [f"| scale, {shape['num_hidden_layers']} blocks x hidden {shape['hidden_size']}, {sequences} x {seq_len} "
            f"tokens, STAT 0.5 global ({plan.execution.describe()}) | build {built:.0f} s, calibrate "
            f"{t.get('calibrate', 0):.0f} s, prune {t.get('prune', 0):.0f} s, total {total:.0f} s (planned "
            f"{plan.seconds:.0f} s: calibrate {plan.phases.get('calibrate', 0):.0f} s, prune "
            f"{plan.seconds - plan.phases.get('calibrate', 0):.0f} s); peak device {peak:,.0f} MB (planned {plan.peak_device_mb:,.0f} MB); achieved "
            f"FLOPs {outcome.achieved['flops_fraction']:.3f} | measured |"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke test; runs on the CPU too)")
    parser.add_argument("--skip-scale", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.small:
        print("error: no CUDA device here; run python -m benchmarks.gpu_check on a GPU machine", file=sys.stderr)
        sys.exit(2)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke test)"
    import transformers

    header = [f"GPU check on {name}, torch {torch.__version__}, transformers {transformers.__version__}", "",
              "| check | result | status |", "|---|---|---|"]
    rows, ok = parity(args.small)
    timing, same = factorization(args.small)
    rows, ok = rows + timing, ok and same
    if not args.skip_scale:
        rows += scale(args.small)
    print("\n".join(header + rows))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
