"""`stat-exp-report DIR... [--metric M] [--out DIR]`: one report over any runs and sweeps.

Yesterday's STAT sweep and today's baseline sweep in one table and one plot, made by the same code
as the report at the end of a sweep. Bad input is one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from stat_exp.track.report import collect_runs, print_table, write_tables


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stat-exp-report",
        description="Collect every results.json under the folders given (runs and sweeps, from any day) "
                    "into report.csv, report.md (failed runs listed apart) and report.png.")
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run or sweep folders to search")
    parser.add_argument("--metric", help="the metric to plot and list first (default: the first perplexity, "
                                         "else the first metric of the ok runs)")
    parser.add_argument("--out", type=Path, default=Path("."), help="where the report files go (default: .)")
    parser.add_argument("--title", default="Report", help="the heading of report.md")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"error: not a folder: {', '.join(missing)}", file=sys.stderr)
        sys.exit(2)
    try:
        paths = write_tables(collect_runs(args.dirs), args.out, args.metric, args.title)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e} (under {', '.join(map(str, args.dirs))})", file=sys.stderr)
        sys.exit(2)
    print_table(pd.read_csv(paths["csv"]))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
