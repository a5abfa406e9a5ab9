"""Peak memory of STAT pruning (gram backend) with 64 and with 256 calibration sequences.

    python -m benchmarks.stat_memory

Each setting runs in its own process; the number is the growth of the peak resident set during
pruning over what the loaded model and batches already used. Target (issue 3): 64 vs 256 within 10%.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys


def measure(num_examples: int) -> dict:
    from benchmarks.common import CPU, smollm2
    from stat_exp.factorize import GramBackend
    from stat_exp.models import get_adapter
    from stat_exp.prune.runner import BudgetSpec, PruneRunner
    from stat_exp.prune.stat import StatPruner
    from stat_exp.track.results import peak_rss_mb

    model, _, batches = smollm2(num_examples)
    import torch  # noqa: F401  (already loaded; read the RSS after every allocation of the set-up)

    before = _rss_mb()
    PruneRunner(StatPruner(), BudgetSpec(0.7, 256), GramBackend(), progress=False).run(model, get_adapter(model), batches, CPU)
    return {"sequences": num_examples, "rss_before_mb": before, "peak_mb": peak_rss_mb(),
            "pruning_growth_mb": peak_rss_mb() - before}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    results = []
    for n in (64, 256):
        out = subprocess.run([sys.executable, "-m", "benchmarks.stat_memory", "--one", str(n)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in results:
        print(f"{r['sequences']:4d} sequences: peak during pruning {r['peak_mb']:.0f} MB "
              f"(growth over the loaded model and data: {r['pruning_growth_mb']:.0f} MB)")
    a, b = (r["pruning_growth_mb"] for r in results)
    print(f"ratio growth 256 / 64: {b / a:.3f}  (target within 10%: 0.9 .. 1.1)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(int(sys.argv[2]))))
    else:
        main()
