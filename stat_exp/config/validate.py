"""The whole composed config checked before anything loads, and completed with the signatures' defaults.

Every group has one typed definition: a `_target_` group the signature of its class, the model
`ModelConfig`, the budget `BudgetSpec`, the execution `ExecutionSpec`, the top-level keys `RunConfig`. A `_target_` node anywhere
else in the tree (a nested plug-in) is checked against its own class too.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stat_exp.config.schema import ModelConfig, RunConfig
from stat_exp.config.signature import check_node, is_target_node, with_defaults
from stat_exp.errors import ConfigError
from stat_exp.execution.choices import ExecutionSpec
from stat_exp.prune.budget import BudgetSpec

TARGET_GROUPS = ("calib", "pruner", "factorization", "logger")  # each names the class it builds
SCHEMAS = {"model": ModelConfig, "budget": BudgetSpec, "execution": ExecutionSpec}
DEFAULTED = ("budget", "execution")  # typed groups completed with their schema's defaults, like `_target_` groups
# Arguments the pipeline passes itself when it instantiates a group (not config values).
SUPPLIED = {
    "factorization": ("device",),
    "logger": ("run_dir", "run_config", "sweep_dir", "name", "job_type"),
}


def top_level_keys() -> list[str]:
    """The keys conf/config.yaml defines at the top: its own values and its groups."""
    return sorted({f.name for f in dataclasses.fields(RunConfig)} | set(SCHEMAS) | set(TARGET_GROUPS) | {"eval"})


def check_config(cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError (one line, naming the full key) for the first bad, unknown or missing value.

    `cfg`: the resolved config as plain containers (OmegaConf.to_container(cfg, resolve=True))."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    check_node("", {k: v for k, v in cfg.items() if k in fields}, RunConfig)
    for group, schema in SCHEMAS.items():
        check_node(group, _group(cfg, group), schema)
    for group in TARGET_GROUPS:
        check_node(group, _target_group(cfg, group), supplied=SUPPLIED.get(group, ()))
    evaluators = _group(cfg, "eval")
    if not evaluators:
        raise ConfigError("eval is empty; choose at least one evaluator, e.g. eval=perplexity")
    for name, node in evaluators.items():
        if not is_target_node(node):
            chosen = [n for n, v in evaluators.items() if is_target_node(v)]
            raise ConfigError(f"eval.{name} is set but {name!r} is not among the evaluators of this run "
                              f"({', '.join(chosen) or 'none'}); add it: eval=[{','.join([*chosen, name])}]")
        check_node(f"eval.{name}", node)


def _group(cfg: Mapping[str, Any], group: str) -> Mapping[str, Any]:
    node = cfg.get(group)
    if not isinstance(node, Mapping):
        raise ConfigError(f"{group} is missing from the config (got {node!r}); choose one: {group}=<name>")
    return node


def _target_group(cfg: Mapping[str, Any], group: str) -> Mapping[str, Any]:
    node = _group(cfg, group)
    if "_target_" not in node:
        raise ConfigError(f"{group} names no class: choose a config ({group}=<name>) or set {group}._target_")
    return node


def with_all_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config with every `_target_` node's signature defaults filled in (recursively), so that
    results.json, W&B and the config hash show each value a job ran with."""
    return _complete(cfg, "")


def _complete(value: Any, key: str) -> Any:
    if isinstance(value, Mapping):
        group = key.split(".")[0]
        if is_target_node(value):
            node = with_defaults(value, SUPPLIED.get(group, ()))
        elif key in DEFAULTED:  # the YAML lists what differs from the schema's defaults
            node = {**_schema_defaults(SCHEMAS[key]), **value}
        else:
            node = dict(value)
        return {k: _complete(v, f"{key}.{k}" if key else k) for k, v in node.items()}
    if isinstance(value, list):
        return [_complete(v, key) for v in value]
    return value


def _schema_defaults(schema: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(schema) if f.default is not dataclasses.MISSING}


def checked_config(cfg) -> dict:
    """The config resolved, checked against every group's typed definition (a ConfigError naming the
    key, before anything loads) and completed with the signatures' defaults."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:  # an interpolation to a key that is not there
        raise ConfigError(str(e).strip().splitlines()[0]) from None
    check_config(plain)
    return with_all_defaults(plain)
