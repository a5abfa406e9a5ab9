"""`python -m stat_exp.execution <the same overrides as a run>` (also `stat-exp-plan`): the plan of
a run as a table, then one JSON line (see `stat_exp.execution.plan`). Nothing loads but the
model's config; the run's parts are built as a run builds them."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from stat_exp.errors import UserError
from stat_exp.execution.plan import make_plan, render


def plan_device(name: str) -> torch.device:
    """The device a run would use; a planner may plan for CUDA on a machine without one."""
    from stat_exp.device import resolve_device

    if name.startswith("cuda") and not torch.cuda.is_available():
        return torch.device(name)
    return resolve_device(name)


def main(argv: list[str] | None = None) -> None:
    """The table, then one JSON line; a bad config: one line on stderr, exit 2."""
    from omegaconf import OmegaConf

    from stat_exp.config.cli import compose_config
    from stat_exp.config.validate import checked_config
    from stat_exp.pipeline import build_parts

    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = OmegaConf.create(checked_config(compose_config(overrides)))
        device = plan_device(cfg.device)
        with tempfile.TemporaryDirectory() as scratch:  # evaluators that write files get a folder
            plan = make_plan(cfg, build_parts(cfg, device, Path(scratch)), device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(render(plan))
    print(json.dumps(plan.summary()))


if __name__ == "__main__":
    main()
