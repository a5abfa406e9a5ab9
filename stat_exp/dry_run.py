"""`dry_run=true`: what a job would run, on one line, printed before anything loads (no weights, no
data, no W&B run, no results.json).

A single run prints its line and stops (stat_exp.run). With `-m`, the sweeper prints the line of
every job of the sweep and launches none (no job directories, nothing submitted to a cluster). The
config is still checked (budget range, the pruner's own options): a job with a bad value prints
its error line instead, and the dry run ends with exit code 2.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from stat_exp.config.validate import checked_config
from stat_exp.errors import UserError
from stat_exp.pipeline import variant_of

# The settings that identify what an evaluator or a calibration reads (shown when present and set).
IDENTIFYING = ("task", "tasks", "version", "source", "text_file", "data_file", "data_dir", "seq_len",
               "num_examples", "num_fewshot")


def describe(cfg: DictConfig, run_dir: Path, choices: Mapping[str, str] | None = None) -> str:
    """One line: model, pruner, budget, calibration, factorization, evaluations and run directory."""
    # what a run checks first; completed with the signatures' defaults, as the run sees it
    cfg = OmegaConf.create(checked_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
    choices = choices or {}
    pruner = _pruner(cfg)
    variant = variant_of(cfg, pruner)
    budget = cfg.budget
    prunes = pruner.prunes and budget.flops < 1
    experiment = choices.get("experiment")
    parts = [f"experiment={experiment}"] if experiment and experiment != "null" else []
    parts += [
        f"model={choices.get('model', cfg.model.name)} ({cfg.model.source}, {cfg.model.task}, {cfg.model.dtype})",
        f"pruner={choices.get('pruner', pruner.name)}" + (f" ({variant})" if variant else ""),
        f"budget.flops={budget.flops} " + (f"(seq_len={budget.seq_len}, {pruner.allocation_under(budget.allocation)})"
                                            if prunes else "(nothing pruned)"),
    ]
    if prunes and pruner.requirements.calibration:
        parts.append(f"calib={choices.get('calib', '?')}{_settings(cfg.calib)}")
    if prunes and pruner.requirements.factorization:
        parts.append(f"factorization={choices.get('factorization', '?')}")
    parts.append("eval=[" + ", ".join(f"{name}{_settings(sub)}" for name, sub in cfg.eval.items()) + "]")
    parts.append(f"run_dir={run_dir}")
    return "dry run: " + " | ".join(parts)


def _pruner(cfg: DictConfig):
    try:
        return instantiate(cfg.pruner)
    except HydraException as err:  # instantiate wraps the pruner's own one-line ConfigError
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


def sweep_job(cfg: DictConfig, num: int) -> str:
    """The line of job `num` of a sweep, from its composed config (with the hydra node)."""
    with open_dict(cfg):
        cfg.hydra.job.num = num
    run_dir = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
    return f"#{num} " + describe(cfg, run_dir, cfg.hydra.runtime.choices)


def _settings(node: DictConfig) -> str:
    plain = OmegaConf.to_container(node, resolve=True)
    shown = [f"{k}={plain[k]}" for k in IDENTIFYING if plain.get(k) is not None]
    return f" ({', '.join(shown)})" if shown else ""
