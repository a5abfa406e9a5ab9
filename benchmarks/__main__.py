"""`make bench`: run every benchmark, or the ones named: python -m benchmarks stat_speed stat_memory"""
from __future__ import annotations

import importlib
import sys

ALL = ["stat_speed", "stat_memory", "stat_quality", "compare_pruners", "encoder_stat", "speedup", "stat_vs_paper", "engine_speed"]


def main() -> None:
    names = sys.argv[1:] or ALL
    for name in names:
        if name not in ALL:
            sys.exit(f"unknown benchmark {name!r}; valid: {', '.join(ALL)}")
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        sys.argv = [module.__file__]  # as `python -m benchmarks.<name>` sees it: results name that command
        module.main()


if __name__ == "__main__":
    main()
