"""STAT prune time versus one dense forward pass, and the gram versus qr backends.

    python -m benchmarks.stat_speed

Targets (issue 3): prune time (gram) / dense forward <= 1.5; gram >= 3x faster than qr on the
same statistics, with the same selection.
"""
from __future__ import annotations

import copy
import time

import torch

from benchmarks.common import CPU, report_table, smollm2
from stat_exp.factorize import GramBackend, QRBackend
from stat_exp.models import get_adapter
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.runner import PruneRunner
from stat_exp.prune.stat import StatPruner


def dense_forward_seconds(model, batches) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            model(**b, use_cache=False)
    return time.perf_counter() - start


def ffn_activations(model, batches, layer_index: int) -> torch.Tensor:
    """The down-projection inputs of one block over the calibration set (non-padding tokens)."""
    down = get_adapter(model).ffn(get_adapter(model).layers()[layer_index]).down
    seen = []
    handle = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
    dense_forward_seconds(model, batches)
    handle.remove()
    return torch.cat(seen)


def backend_seconds(backend, A: torch.Tensor, weights: torch.Tensor, blocks: int):
    start = time.perf_counter()
    acc = backend.accumulator(A.shape[1])
    for part in A.chunk(blocks):
        acc.update(part)
    fact = acc.factorize(weights)
    return time.perf_counter() - start, fact


def main() -> None:
    model, _, batches = smollm2()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    forward = min(dense_forward_seconds(model, batches) for _ in range(2))
    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    PruneRunner(StatPruner(), BudgetSpec(0.7, 256), GramBackend(), progress=False).run(pruned, get_adapter(pruned), batches, CPU)
    prune = time.perf_counter() - start
    summary = [f"calibration: {len(batches)} batches, {tokens} tokens",
               f"dense forward over the calibration set: {forward:.1f} s",
               f"STAT prune (gram, budget.flops=0.7, global): {prune:.1f} s",
               f"ratio prune / dense forward: {prune / forward:.2f}  (target <= 1.5)"]
    print("\n".join(summary), flush=True)

    rows = []
    for layer in (3, 15, 27):
        A = ffn_activations(model, batches, layer)
        w = get_adapter(model).ffn(get_adapter(model).layers()[layer]).down.weight.detach().norm(dim=0)
        t_gram, f_gram = backend_seconds(GramBackend(), A, w, len(batches))
        t_qr, f_qr = backend_seconds(QRBackend(), A, w, len(batches))
        k = A.shape[1] // 2
        same = len(set(f_gram.perm[:k].tolist()) & set(f_qr.perm[:k].tolist())) / k
        rows.append({"layer": layer, "gram (s)": t_gram, "qr (s)": t_qr, "qr / gram": t_qr / t_gram,
                     "same kept half": f"{same:.1%}"})
        print(rows[-1], flush=True)
    total_gram, total_qr = sum(r["gram (s)"] for r in rows), sum(r["qr (s)"] for r in rows)
    summary.append(f"gram vs qr on the same activations: gram {total_qr / total_gram:.1f}x faster (target >= 3x)")
    report_table("stat_speed", rows, "SmolLM2-135M, 64 x 256 calibration tokens of wiki_calib. Per layer: the FFN "
                 "down-projection inputs over the calibration set factorized by each backend (fed in one block per "
                 "batch); same kept half: the share of the first half of the pivots both backends keep.\n\n"
                 + "\n".join(f"- {line}" for line in summary))


if __name__ == "__main__":
    main()
