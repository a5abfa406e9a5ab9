"""`dry_run=true`: what a job would run, on one line, printed before anything loads (no weights, no
data, no W&B run, no results.json).

A single run prints its line and stops (stat_exp.run). With `-m`, the sweeper prints the line of
every job of the sweep and launches none (no job directories, nothing submitted to a cluster). Every
check of a real run that needs no weights runs (the config's values, then stat_exp.preflight: the
model folder, data files, evaluators against the model, lengths, calibration size): a job that would
fail prints its error line instead, and the dry run ends with exit code 2.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from stat_exp.config.validate import checked_config
from stat_exp.data.text import hub_offline
from stat_exp.errors import UserError
from stat_exp.parts import build_parts
from stat_exp.pipeline import variant_of
from stat_exp.preflight import preflight

# The settings that identify what an evaluator or a calibration reads (shown when present and set).
IDENTIFYING = ("task", "tasks", "version", "source", "text_file", "data_file", "data_dir", "seq_len",
               "num_examples", "num_fewshot", "max_length", "with_replacement")
# The pruner settings shown: stat_paper's switches between the released scripts and the intended method.
PRUNER_SWITCHES = ("procedure", "recompute_heads", "as_released", "head_error", "flops_shares")


def describe(cfg: DictConfig, run_dir: Path, choices: Mapping[str, str] | None = None) -> str:
    """One line: model, pruner, budget, calibration, factorization, evaluations and run directory."""
    # what a run checks first; completed with the signatures' defaults, as the run sees it
    cfg = OmegaConf.create(checked_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])))
    choices = choices or {}
    try:
        built = build_parts(cfg, torch.device("cpu"), run_dir)  # the device is only where a backend would run
    except (UserError, HydraException):
        if not hub_offline():
            raise
        # offline, evaluators that read the hub when built (SQuAD, standard lm-eval tasks) cannot be:
        # the job is still listed, its checks are left to the run
        pruner, calibration = instantiate(cfg.pruner), instantiate(cfg.calib)
    else:
        preflight(cfg, built)
        pruner, calibration = built.pruner, built.calibration
    variant = variant_of(cfg, pruner, calibration)
    budget = cfg.budget
    prunes = pruner.prunes and budget.flops < 1
    experiment = choices.get("experiment")
    parts = [f"experiment={experiment}"] if experiment and experiment != "null" else []
    parts += [
        f"model={choices.get('model', cfg.model.name)} ({cfg.model.source}, {cfg.model.task}, {cfg.model.dtype})",
        f"pruner={choices.get('pruner', pruner.name)}" + (f" ({variant})" if variant else "")
        + _settings(cfg.pruner, PRUNER_SWITCHES),
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


def sweep_job(cfg: DictConfig, num: int) -> str:
    """The line of job `num` of a sweep, from its composed config (with the hydra node)."""
    with open_dict(cfg):
        cfg.hydra.job.num = num
    run_dir = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
    return f"#{num} " + describe(cfg, run_dir, cfg.hydra.runtime.choices)


def _settings(node: DictConfig, keys: tuple[str, ...] = IDENTIFYING) -> str:
    plain = OmegaConf.to_container(node, resolve=True)
    shown = [f"{k}={plain[k]}" for k in keys if plain.get(k) is not None]
    return f" ({', '.join(shown)})" if shown else ""
