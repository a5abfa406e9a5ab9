"""The Hydra entry point: `python -m stat_exp.run ...` or `stat-exp ...`.

Turns a composed config into a pipeline call. Bad input (an unknown model, pruner or eval name,
a budget out of range, a missing file) ends with one line and exit code 2. In a sweep a failed
job is recorded as failed and the others go on; the sweep then exits 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from stat_exp.dry_run import describe
from stat_exp.errors import UserError
from stat_exp.pipeline import run_pipeline

CONF_DIR = Path(__file__).resolve().parent / "conf"
CHECKED_GROUPS = ("model", "calib", "pruner", "budget", "factorization", "eval", "logger", "experiment")
_failed_jobs: list[str] = []


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_overrides(argv: list[str]) -> None:
    """Unknown config-group choices -> one line naming the valid ones (before Hydra's long error)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in CHECKED_GROUPS or value.startswith(("glob(", "choice(", "range(")) or value == "null":
            continue
        valid = group_options(key)
        for choice in value.replace("[", ",").replace("]", ",").split(","):
            if choice and choice not in valid:
                raise UserError(f"unknown {key} {choice!r}; valid: {', '.join(valid)}")


def _user_error(exc: BaseException) -> UserError | None:
    """The bad-input error behind `exc`, also when Hydra's instantiate wrapped it."""
    while exc is not None:
        if isinstance(exc, UserError):
            return exc
        exc = exc.__cause__
    return None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _job(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    try:
        if cfg.get("dry_run"):
            print(describe(cfg, run_dir, hc.runtime.choices), flush=True)
            return
        run_pipeline(cfg, run_dir, Path(hc.sweep.dir) if multirun else None)
    except Exception as e:
        user = _user_error(e)
        shown = user or e
        message = str(shown).strip().splitlines()[0] if str(shown).strip() else type(e).__name__
        print(f"error: {message}" + ("" if user else f" ({type(e).__name__}; see {run_dir}/results.json)"),
              file=sys.stderr)
        if not multirun:
            if not user:
                raise
            sys.exit(2)
        _failed_jobs.append(str(run_dir))


def main() -> None:
    try:
        check_overrides(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _job()
    if _failed_jobs:
        print(f"{len(_failed_jobs)} job(s) failed: {', '.join(_failed_jobs)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
