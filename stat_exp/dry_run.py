"""`dry_run=true`: each job prints what it would run, on one line, and stops before anything loads
(no weights, no data, no W&B run, no results.json). With `-m` the lines list the whole sweep.

The config is still checked (budget range, the pruner's own options), so a dry run also finds the
bad values of a sweep before any job spends time on them.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stat_exp.pipeline import validate, variant_of

# The settings that identify what an evaluator or a calibration reads (shown when present and set).
IDENTIFYING = ("task", "tasks", "version", "source", "text_file", "data_file", "data_dir", "seq_len",
               "num_examples", "num_fewshot")


def describe(cfg: DictConfig, run_dir: Path, choices: Mapping[str, str] | None = None) -> str:
    """One line: model, pruner, budget, calibration, factorization, evaluations and run directory."""
    validate(cfg)
    choices = choices or {}
    pruner = instantiate(cfg.pruner)
    variant = variant_of(cfg, pruner)
    budget = cfg.budget
    parts = [
        f"model={choices.get('model', cfg.model.name)} ({cfg.model.source}, {cfg.model.task}, {cfg.model.dtype})",
        f"pruner={choices.get('pruner', pruner.name)}" + (f" ({variant})" if variant else ""),
        f"budget.flops={budget.flops} (seq_len={budget.seq_len}, {pruner.allocation_under(budget.allocation)})",
    ]
    prunes = pruner.prunes and budget.flops < 1
    if prunes and pruner.needs_calibration:
        parts.append(f"calib={choices.get('calib', '?')}{_settings(cfg.calib)}")
    if prunes and pruner.needs_factorization:
        parts.append(f"factorization={choices.get('factorization', '?')}")
    parts.append("eval=[" + ", ".join(f"{name}{_settings(sub)}" for name, sub in cfg.eval.items()) + "]")
    parts.append(f"run_dir={run_dir}")
    return "dry run: " + " | ".join(parts)


def _settings(node: DictConfig) -> str:
    plain = OmegaConf.to_container(node, resolve=True)
    shown = [f"{k}={plain[k]}" for k in IDENTIFYING if plain.get(k) is not None]
    return f" ({', '.join(shown)})" if shown else ""
