"""The parts of a run built from its config before any weight loads: pruner, backend, calibration
source, evaluators and adapter. The checks before loading (preflight), the planner and the pipeline
all read these same objects, so nothing is built twice."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from stat_exp.data.base import Calibration
from stat_exp.eval.base import Evaluator
from stat_exp.factorize.base import Backend
from stat_exp.models import AdapterFactory, adapter_from_config
from stat_exp.prune.base import Pruner
from stat_exp.prune.plan_selection import max_candidates, selects_plan


@dataclass(frozen=True)
class Parts:
    """Every part of a run built from its config, before the model loads."""

    pruner: Pruner
    backend: Backend | None
    calibration: Calibration
    evaluators: dict[str, Evaluator]
    adapter: AdapterFactory | None = None
    held_out_streams: int = 0  # sequences streamed to choose the global plan (plan_selection)
    held_out_examples: int = 0  # held-out examples run forward and backward (budget.select=output_priced: prune.sensitivity)
    held_out_candidates: int = 0  # plans the choice compares, each pruning a copy of every block


def build_parts(cfg: DictConfig, device: torch.device, run_dir: Path) -> Parts:
    """Every part of a run built from its config, before the model loads (so a bad setting fails
    first); the planner sizes these same objects."""
    pruner: Pruner = instantiate(cfg.pruner)
    adapter = adapter_from_config(cfg.model.get("adapter"))
    evaluators = make_evaluators(cfg.eval, run_dir)
    backend = instantiate(cfg.factorization, device=device) if pruner.requirements.factorization else None
    held_out = cfg.budget.held_out_examples if selects_plan(cfg.budget, pruner) else 0
    weighed = held_out if cfg.budget.select == "output_priced" else 0  # also run forward and backward
    candidates = max_candidates(cfg.budget.select) if held_out else 0
    return Parts(pruner, backend, instantiate(cfg.calib), evaluators, adapter, held_out * (candidates + 1), weighed,
                 candidates)


def make_evaluators(eval_cfg: DictConfig, run_dir: Path) -> dict[str, Evaluator]:
    """One evaluator per entry of `eval` (`eval=[perplexity,latency]` composes several), built before
    the model loads so a bad evaluation setting fails first. Evaluators that write files (tables)
    get the run directory unless their config names one."""
    evaluators: dict[str, Evaluator] = {}
    for name, sub in eval_cfg.items():
        extra = {"output_dir": str(run_dir)} if "output_dir" in sub and sub.output_dir is None else {}
        evaluators[str(name)] = instantiate(sub, **extra)
    return evaluators
