"""Every check a run can make before its weights load, in one place.

The config has already been checked value by value against its typed definitions
(stat_exp.config.validate) and its parts built (stat_exp.parts.build_parts); here they are
checked against each other, against the model's config.json and against the data files: the model
folder (config.json, weight headers, the head the task needs), each evaluator against the model's
task and architecture, every length against the model's positions, each data file (exists,
readable, text; hub names parse), and the calibration tokens against the largest rank the budget
can keep. A real run (stat_exp.pipeline), `dry_run=true` (stat_exp.dry_run) and the planner's
command line (stat_exp.execution) all call `preflight`, so each mistake is one line, exit 2, found
in seconds instead of after calibration and pruning.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from stat_exp import assets
from stat_exp.data.base import Calibration
from stat_exp.errors import ConfigError, UserError
from stat_exp.eval.base import Evaluator
from stat_exp.execution.plan import meta_model
from stat_exp.parts import Parts
from stat_exp.models import get_adapter
from stat_exp.models.checkpoint import check_folder
from stat_exp.models.flops import shapes_of
from stat_exp.models.loading import resolve_source

# The class-name endings of checkpoints trained with the head a task loads (anything else leaves
# that head untrained). model.task=encoder loads the base model of any checkpoint.
HEADS = {"causal_lm": ("ForCausalLM", "LMHeadModel"), "question_answering": ("ForQuestionAnswering",),
         "sequence_classification": ("ForSequenceClassification",)}


def preflight(cfg: DictConfig, parts: Parts, weights: bool = True) -> PretrainedConfig | None:
    """Every check of a run that needs no weights, on its checked config (stat_exp.config.validate)
    and the parts built from it (stat_exp.parts.build_parts); returns the model's config (None
    for a hub model offline and not cached: the checks that need it are left to the run, which
    stops in one line when it cannot read it). Raises a one-line UserError for the first problem.
    `weights=False` (the planner): a local folder may hold config.json alone."""
    pruner, calibration, evaluators = parts.pruner, parts.calibration, parts.evaluators
    if not isinstance(calibration, Calibration):
        raise ConfigError(f"calib._target_={cfg.calib._target_} is not a calibration source: subclass "
                          f"stat_exp.data.base.Calibration")
    for name, evaluator in evaluators.items():
        if not isinstance(evaluator, Evaluator):
            raise ConfigError(f"eval.{name}._target_={cfg.eval[name]._target_} is not an evaluator: subclass "
                              f"stat_exp.eval.base.Evaluator")
    config = model_config(cfg.model.source, cfg.model.task, weights)
    prunes = pruner.prunes and cfg.budget.flops < 1
    calibrates = prunes and pruner.requirements.calibration
    check_evaluators(config, cfg.model.task, evaluators)
    for part in ([calibration] if calibrates else []) + list(evaluators.values()):
        part.check()
    if config is None:
        return None
    lengths = {f"eval.{name}": e.lengths()[1] for name, e in evaluators.items()}
    lengths |= {"calib": calibration.longest_sequence} if calibrates else {}
    lengths |= {"budget.seq_len": cfg.budget.seq_len} if prunes else {}
    check_lengths(config, cfg.model.source, lengths)
    if calibrates and pruner.corrects and pruner.allocation_under(cfg.budget.allocation) == "global":
        check_tokens(calibration, cfg, parts)
    return config


def model_config(source: str, task: str, weights: bool = True) -> PretrainedConfig | None:
    """The model's config, read without weights: a local folder is checked whole (config.json, the
    safetensors headers against it, a class for the task); a hub id is looked up (or in the cache
    when offline). A missing local path is named as such, not taken for a hub id."""
    path = Path(resolve_source(source)).expanduser()
    if path.is_dir():
        config, _ = check_folder(path, task, weights)
    elif _looks_local(source):
        raise UserError(f"model.source={source!r}: no such folder (nor one of the embedded models: "
                        f"{', '.join(assets.model_names())})")
    else:
        config = _hub_config(source)
        if config is None:
            return None
    _check_head(config, task, source)
    return config


def _looks_local(source: str) -> bool:
    """A path, not a hub id (`name` or `owner/name`)."""
    return (source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source
            or Path(source).exists())


def _hub_config(source: str) -> PretrainedConfig | None:
    """The config of a hub model; None offline when it is not in the cache."""
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            return None
        raise UserError(f"model {source!r} is neither an embedded model ({', '.join(assets.model_names())}) nor "
                        f"a local folder, and cannot be read from the hub: {str(e).strip().splitlines()[0]}") from None


def _check_head(config: PretrainedConfig, task: str, source: str) -> None:
    """A task with a head (causal LM, QA, classification) on a checkpoint trained with another head
    would run with an untrained one: refused, naming the checkpoint's class."""
    trained = getattr(config, "architectures", None) or []
    if task in HEADS and trained and not any(a.endswith(HEADS[task]) for a in trained):
        raise ConfigError(f"model.task={task} but {source} is a {trained[0]} checkpoint: its {task} head would "
                          f"be untrained; choose the model's own task (or model.task=encoder)")


def is_decoder(config: PretrainedConfig) -> bool:
    """A causal (decoder-only) architecture: no masked-LM form, or configured as a decoder."""
    return bool(getattr(config, "is_decoder", False)) or config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def check_evaluators(config: PretrainedConfig | None, task: str, evaluators: dict[str, Evaluator]) -> None:
    for name, evaluator in evaluators.items():
        if evaluator.tasks and task not in evaluator.tasks:
            raise ConfigError(f"eval={name} measures a {' or '.join(evaluator.tasks)} model, but model.task={task}; "
                              f"choose another evaluator or a model with that task")
        if evaluator.encoders_only and config is not None and is_decoder(config):
            raise ConfigError(f"eval={name} measures an encoder's representations; {config.model_type} is a "
                              f"decoder (choose an encoder model or another evaluator)")


def positions(config: PretrainedConfig) -> int | None:
    """The sequence length the model was built for (None when its config does not say)."""
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_lengths(config: PretrainedConfig, source: str, lengths: dict[str, int | None]) -> None:
    """Every length (key -> tokens) within the model's positions."""
    limit = positions(config)
    if limit is None:
        return
    for key, length in lengths.items():
        if length is not None and length > limit:
            raise ConfigError(f"{key} asks for sequences of {length} tokens; model {source} has {limit} positions")


def check_tokens(calibration: Calibration, cfg: DictConfig, parts: Parts) -> None:
    """A correction fitted per layer needs at least as many calibration tokens as units a layer keeps;
    the global allocation may keep all but one unit of any layer. Sources whose token count depends
    on the data (padded examples) are checked when pruning instead."""
    tokens = calibration.tokens
    if tokens is None:
        return
    model = meta_model(cfg.model.source, cfg.model.task, cfg.model.dtype)
    width = max(s.ffn_width for s in shapes_of(get_adapter(model, parts.adapter)))
    if tokens < width - 1:
        raise ConfigError(f"calibration has {tokens} tokens (calib.num_examples x its sequence length) but the "
                          f"global allocation may keep up to {width - 1} neurons of a layer, and the correction "
                          f"needs at least as many tokens as kept units: raise calib.num_examples or calib.seq_len "
                          f"(or budget.allocation=uniform)")
