"""Peak memory of STAT pruning (gram backend) with 64 and with 256 calibration sequences.

    python -m benchmarks.stat_memory

Each setting runs in its own process. After the model and batches are loaded, memory the set-up
freed is handed back to the OS and the peak-RSS mark is reset (Linux), so the number is the peak
growth of the resident set during pruning alone. Target (issue 3): 64 vs 256 within 10%.
"""
from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
from pathlib import Path


def measure(num_examples: int) -> dict:
    from benchmarks.common import CPU, smollm2
    from stat_exp.factorize import GramBackend
    from stat_exp.models import get_adapter
    from stat_exp.prune.budget import BudgetSpec
    from stat_exp.prune.runner import PruneRunner
    from stat_exp.prune.stat import StatPruner

    model, _, batches = smollm2(num_examples)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the tokenizer's freed buffers are not pruning's
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_mb("VmRSS")
    PruneRunner(StatPruner(), BudgetSpec(0.7, 256), GramBackend(), progress=False).run(
        model, get_adapter(model), batches, CPU)
    peak = _status_mb("VmHWM")
    return {"sequences": num_examples, "rss_before_mb": before, "peak_mb": peak, "pruning_growth_mb": peak - before}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key} (this benchmark needs Linux)")


def main() -> None:
    results = []
    for n in (64, 256):
        out = subprocess.run([sys.executable, "-m", "benchmarks.stat_memory", "--one", str(n)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    from benchmarks.common import report_table

    a, b = (r["pruning_growth_mb"] for r in results)
    report_table("stat_memory", [{"sequences": r["sequences"], "peak during pruning (MB)": round(r["peak_mb"]),
                                  "growth over the loaded model and data (MB)": round(r["pruning_growth_mb"])}
                                 for r in results],
                 "STAT pruning of SmolLM2-135M (gram backend, budget.flops=0.7, sequences of 256 tokens), each setting in "
                 f"its own process; peak-RSS mark reset after loading. Ratio growth 256 / 64: {b / a:.3f} (target within "
                 "10%: 0.9 .. 1.1).")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(int(sys.argv[2]))))
    else:
        main()
