"""Fit the planner's CPU rates (stat_exp.execution.plan.RATES["cpu"]) on this machine.

    python -m benchmarks.plan_fit [--width 2048] [--hidden 2048] [--reps 3]

Times, in one process and side by side, a float32 matmul (the rate `measured_tflops` probes), the
float32 Gram tiles of `width` units over `width` tokens, the pivoted Cholesky of that Gram, the
in-sample error curve of a factor of it (float64, `hidden` outputs) and the overfit check's
held-out curve (the fit's lifted Cholesky and `correction.error_curve`), and prints each phase's
rate as a share of the matmul's, in the flops the planner counts for it (`plan_sizes`). Best of
`reps` each (the machine may be shared). `--width 11008 --hidden 4096` is a Llama-2-7B FFN.
"""
from __future__ import annotations

import argparse
import time

import torch

from stat_exp.factorize import GramBackend, pivoted_cholesky
from stat_exp.factorize.base import Factorization
from stat_exp.execution.plan import measured_tflops
from stat_exp.prune.correction import error_curve, ridged_cholesky


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=None, help="output width of the curves (default: width)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    m, d, reps = args.width, args.hidden or args.width, args.reps
    rate = measured_tflops(torch.device("cpu"), torch.float32) * 1e12
    g = torch.Generator().manual_seed(0)
    X = torch.randn(m, m, generator=g) * torch.logspace(0, -2, m)
    acc = GramBackend().accumulator(m)
    gram_s = best(lambda: acc.update(X), reps)
    G = (X.double().T @ X.double())
    factor_s = best(lambda: pivoted_cholesky(G), reps)
    perm, R = pivoted_cholesky(G)
    fact = Factorization(perm, R, torch.ones(m, dtype=torch.float64))
    V = torch.randn(d, m, dtype=torch.float64, generator=g)
    curve_s = best(lambda: fact.output_error(V), reps)
    check_s = best(lambda: error_curve(ridged_cholesky(G), V, G), reps)
    shares = {"gram": m * m * m / gram_s / rate, "factor": m ** 3 / 3 / factor_s / rate,
              "float64": d * m * m / curve_s / rate, "check": (5 * m ** 3 / 3 + 2 * d * m * m) / check_s / rate}
    print(f"float32 matmul: {rate / 1e12:.3f} TFLOP/s; width {m}, hidden {d}: Gram {gram_s:.2f} s, "
          f"factor {factor_s:.2f} s, curve {curve_s:.2f} s, check {check_s:.2f} s")
    print("shares of the matmul rate: " + ", ".join(f"{k}={v:.2f}" for k, v in shares.items()))


if __name__ == "__main__":
    main()
