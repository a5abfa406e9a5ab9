"""Fit the planner's CPU rates (stat_exp.execution.plan.RATES["cpu"]) on this machine.

    python -m benchmarks.plan_fit [--width 2048]

Times, in one process and side by side, a float32 matmul (the rate `measured_tflops` probes), the
float32 Gram tiles of `width` units over `width` tokens, the pivoted Cholesky of that Gram, and
the error curve of a factor of it (float64), and prints each phase's rate as a share of the
matmul's, in the flops the planner counts for it. Best of three each (the machine may be shared).
"""
from __future__ import annotations

import argparse
import time

import torch

from stat_exp.factorize import GramBackend, pivoted_cholesky
from stat_exp.factorize.base import Factorization
from stat_exp.execution.plan import measured_tflops


def best(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=2048)
    m = parser.parse_args().width
    rate = measured_tflops(torch.device("cpu"), torch.float32) * 1e12
    g = torch.Generator().manual_seed(0)
    X = torch.randn(m, m, generator=g) * torch.logspace(0, -2, m)
    acc = GramBackend().accumulator(m)
    gram_s = best(lambda: acc.update(X))
    G = (X.double().T @ X.double())
    factor_s = best(lambda: pivoted_cholesky(G))
    perm, R = pivoted_cholesky(G)
    fact = Factorization(perm, R, torch.ones(m, dtype=torch.float64))
    V = torch.randn(m, m, dtype=torch.float64, generator=g)
    curve_s = best(lambda: fact.output_error(V))
    shares = {"gram": m * m * m / gram_s / rate, "factor": m ** 3 / 3 / factor_s / rate,
              "float64": m * m * m / curve_s / rate}
    print(f"float32 matmul: {rate / 1e12:.3f} TFLOP/s; width {m}: Gram {gram_s:.2f} s, factor {factor_s:.2f} s, "
          f"curve {curve_s:.2f} s")
    print("Rates(" + ", ".join(f"{k}={v:.2f}" for k, v in shares.items()) + ")")


if __name__ == "__main__":
    main()
