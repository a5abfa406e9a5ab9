"""A `_target_` config node checked against its class's `__init__` signature.

The signature is the schema: its parameters are the allowed keys, its type hints (with `Literal[...]`
for closed choices and annotated-types constraints) the allowed values, its defaults the defaults.
So a pruner, backend or evaluator written outside this package is checked exactly like ours.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Collection, Mapping
from typing import Any, Literal

from hydra.utils import get_object
from pydantic import ConfigDict, TypeAdapter, ValidationError

from stat_exp.errors import ConfigError

HYDRA_KEYS = frozenset({"_target_", "_args_", "_recursive_", "_convert_", "_partial_"})
# Strict: a YAML/command-line value already has its type; "256" is not silently an int.
_STRICT = ConfigDict(strict=True, arbitrary_types_allowed=True)
_PLAIN = (type(None), bool, int, float, str)


@dataclasses.dataclass(frozen=True)
class Signature:
    """What a target accepts: its keyword parameters with hints and defaults, and whether it takes **kwargs."""

    target: Any
    params: dict[str, inspect.Parameter]
    hints: dict[str, Any]
    open: bool  # **kwargs: any further key is passed on

    @property
    def label(self) -> str:
        return getattr(self.target, "__qualname__", str(self.target))


def is_target_node(value: Any) -> bool:
    """A node Hydra instantiates (`_target_: null` marks an optional plug-in left unset)."""
    return isinstance(value, Mapping) and value.get("_target_") is not None


def locate(key: str, node: Mapping) -> Any:
    """The class or callable a node's `_target_` names; a ConfigError when it cannot be imported."""
    path = node["_target_"]
    try:
        return get_object(path)
    except Exception as e:  # noqa: BLE001 - import errors of any kind become one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}._target_={path!r} cannot be imported: {reason}") from None


@functools.lru_cache(maxsize=None)
def signature_of(target: Any) -> Signature:
    sig = inspect.signature(target)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = {n: p for n, p in sig.parameters.items() if p.kind in kinds}
    open_ = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return Signature(target, params, _hints(target, params), open_)


def _hints(target: Any, params: Mapping[str, inspect.Parameter]) -> dict[str, Any]:
    """Resolved type hints; a hint that cannot be resolved (a TYPE_CHECKING-only name) is Any."""
    func = target if not isinstance(target, type) or dataclasses.is_dataclass(target) else target.__init__
    try:
        return typing.get_type_hints(func, include_extras=True)
    except Exception:  # noqa: BLE001 - fall back hint by hint
        pass
    namespace = getattr(inspect.getmodule(target), "__dict__", {})
    hints = {}
    for name, p in params.items():
        try:
            hints[name] = eval(p.annotation, namespace) if isinstance(p.annotation, str) else p.annotation
        except Exception:  # noqa: BLE001
            hints[name] = Any
    return hints


@functools.lru_cache(maxsize=None)
def _adapter(hint: Any) -> TypeAdapter:
    return TypeAdapter(hint, config=_STRICT)


def check_node(key: str, node: Mapping, schema: Any = None, supplied: Collection[str] = ()) -> Signature:
    """Raise ConfigError naming the full key of the first unknown key, missing value or bad value.

    `schema`: the class whose signature the node follows (default: the node's `_target_`);
    `supplied`: parameters the caller passes when it instantiates (a device, a run directory)."""
    sig = signature_of(schema if schema is not None else locate(key, node))
    for name, value in node.items():
        full = f"{key}.{name}" if key else name
        if name in HYDRA_KEYS:
            continue
        if name not in sig.params:
            if sig.open:
                continue
            raise ConfigError(f"{full}: unknown key for {sig.label}; valid: {', '.join(sig.params) or 'none'}")
        if _has_targets(value):
            check_nested(full, value)
            continue
        hint = sig.hints.get(name, Any)
        if hint is Any or (sig.params[name].annotation is inspect.Parameter.empty):
            continue
        try:
            _adapter(hint).validate_python(value)
        except ValidationError as e:
            raise ConfigError(value_error(full, value, hint, e)) from None
    missing = [n for n, p in sig.params.items()
               if p.default is inspect.Parameter.empty and n not in node and n not in supplied]
    if missing and "_partial_" not in node:
        raise ConfigError(f"{f'{key}.' if key else ''}{missing[0]} is required by {sig.label} (no default)")
    return sig


def _has_targets(value: Any) -> bool:
    if is_target_node(value):
        return True
    return isinstance(value, list) and any(is_target_node(v) for v in value)


def check_nested(key: str, value: Any) -> None:
    """A parameter whose value is itself a `_target_` node (or a list of them), instantiated by Hydra."""
    if is_target_node(value):
        check_node(key, value)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if is_target_node(item):
                check_node(f"{key}[{i}]", item)


def with_defaults(node: Mapping, supplied: Collection[str] = ()) -> dict:
    """The node with every plain default of its signature filled in, so records show every value."""
    sig = signature_of(get_object(node["_target_"]))
    full = dict(node)
    for name, p in sig.params.items():
        if name in full or name in supplied or p.default is inspect.Parameter.empty:
            continue
        default = list(p.default) if isinstance(p.default, tuple) else p.default
        if _plain(default):
            full[name] = default
    return full


def _plain(value: Any) -> bool:
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def value_error(key: str, value: Any, hint: Any, error: ValidationError) -> str:
    """One line: `pruner.gqa='x'; allowed: per_group, whole_groups` or `...=0; must be greater than 0`."""
    errors = error.errors()
    first = errors[0]
    path = _path(value, first["loc"])
    where = key + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    shown = first["input"] if path else value
    open_errors = [e for e in errors if e["type"] != "literal_error"]
    closed = len(open_errors) < len(errors)
    if closed:
        allowed = [str(v) for v in closed_choices(hint)]
        if not path and _optional(hint):
            allowed.append("null")
        if all(e["type"].endswith("_type") for e in open_errors):  # not even the right kind of value
            return f"{where}={shown!r}; allowed: {', '.join(allowed)}"
    reasons = list(dict.fromkeys(re.sub(r"^Input should be ", "", e["msg"]) for e in open_errors or errors))
    if closed:  # a number out of range where a name is also allowed: say both
        reasons.append(f"one of: {', '.join(allowed)}")
    return f"{where}={shown!r}; must be {' or '.join(reasons)}"


def _path(value: Any, loc: tuple) -> list:
    """The part of pydantic's error location that indexes the value (list positions, dict keys),
    without the tags it adds for the members of a union."""
    path = []
    for part in loc:
        if isinstance(part, int) and isinstance(value, list) and part < len(value):
            value = value[part]
        elif isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            continue
        path.append(part)
    return path


def _optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint) or hint is None


def closed_choices(hint: Any) -> list[Any]:
    """The values of the `Literal[...]` in a hint (through Optional, Annotated, Sequence...); [] when open."""
    if typing.get_origin(hint) is Literal:
        return list(typing.get_args(hint))
    return [v for arg in typing.get_args(hint) for v in closed_choices(arg)]
