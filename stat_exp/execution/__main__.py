"""`python -m stat_exp.execution <the same overrides as a run>` (also `stat-exp-plan`): the plan of
a run as a table, then one JSON line (see `stat_exp.execution.plan`). Nothing loads but the
model's config; the run's parts are built as a run builds them."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from stat_exp.execution.plan import make_plan, render


def plan_device(name: str) -> torch.device:
    """The device a run would use; a planner may plan for CUDA on a machine without one."""
    from stat_exp.device import resolve_device

    if name.startswith("cuda") and not torch.cuda.is_available():
        return torch.device(name)
    return resolve_device(name)


USAGE = """usage: python -m stat_exp.execution [KEY=VALUE ...]   (also: stat-exp-plan)

Peak host and device memory, disk and time of the run `stat-exp KEY=VALUE ...` would start, from
the model's config alone (no weights are read). The same overrides as a run (model=..., pruner=...,
budget.flops=..., calib.num_examples=..., execution.offload=..., device=cuda
execution.device_memory_mb=...). Every check a run makes before its weights load runs first.
Prints a table, then one JSON line. Bad input: one line, exit 2."""


def main(argv: list[str] | None = None) -> None:
    """The table, then one JSON line (`--help`: usage); every failure one line (stat_exp.exits)."""
    from stat_exp.exits import exit_cleanly

    overrides = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(overrides):
        print(USAGE)
        return
    exit_cleanly(lambda: _plan(overrides))


def _plan(overrides: list[str]) -> None:
    from omegaconf import OmegaConf

    from stat_exp.config.cli import check_overrides, compose_config
    from stat_exp.config.validate import checked_config
    from stat_exp.parts import build_parts
    from stat_exp.preflight import preflight

    check_overrides(overrides)
    cfg = OmegaConf.create(checked_config(compose_config(overrides)))
    device = plan_device(cfg.device)
    with tempfile.TemporaryDirectory() as scratch:  # evaluators that write files get a folder
        parts = build_parts(cfg, device, Path(scratch))
        preflight(cfg, parts, weights=False)
        plan = make_plan(cfg, parts, device)
    print(render(plan))
    print(json.dumps(plan.summary(), allow_nan=False))


if __name__ == "__main__":
    main()
