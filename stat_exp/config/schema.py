"""Typed definitions of the groups that are not `_target_` classes: the model and the top-level keys.

Their values live in the YAML files (conf/config.yaml, conf/model/*.yaml), their types and allowed
values here; the budget's definition is `stat_exp.prune.budget.BudgetSpec` itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stat_exp.export.llama_cpp import OUTTYPES
from stat_exp.models.loading import DTYPES, TASKS
from stat_exp.types import NonNegativeInt, PositiveInt, Seed, SquadVersion


@dataclass(frozen=True)
class ModelConfig:
    """conf/model/*.yaml: which weights, with which head, in which dtype."""

    name: str
    source: str  # an embedded asset name, a local folder or a hub id
    task: Literal[tuple(TASKS)]  # the loader's own list, so the two cannot drift apart
    dtype: Literal[DTYPES]
    glue_task: str | None = None  # eval=glue and calib=glue take their task from here
    label_map: list[NonNegativeInt] | None = None  # label_map[i]: the model's output index for dataset label i
    squad_version: SquadVersion | None = None  # eval=squad and calib=squad take their version from here
    round_to: PositiveInt = 1  # budget.round_to's default: GPU model configs keep neuron counts in multiples of 64
    # an adapter of your own, {_target_: your_module.YourAdapter, _partial_: true, ...options}; `_target_: null`
    # (the default): the explicit adapter of config.model_type, else discovery
    adapter: dict | None = None


@dataclass(frozen=True)
class RunConfig:
    """The top-level keys of conf/config.yaml (experiments may add their own helper keys beside them)."""

    device: str  # auto | cpu | cuda | cuda:N (checked by stat_exp.device.resolve_device)
    seed: Seed
    save_model: bool
    progress: bool
    resume: bool  # skip jobs whose results.json is ok for the same config hash
    objective: str | None  # the metric a job returns to a sweeper (optuna); null: the first perplexity, else the first metric
    dry_run: bool = False  # print what each job would run and stop before anything loads
    save_gguf: Literal[OUTTYPES] | None = None  # with save_model: also run_dir/model-<type>.gguf for llama.cpp

