"""The command line before Hydra sees it: unknown group choices as one line, and plain keys made overridable.

Group options are looked up through Hydra's own config search path, so configs added with
`--config-dir`, `hydra.searchpath` or a plug-in package count like the packaged ones. Config files of
`_target_` groups hold only what differs from their class's defaults, so an override of a key a file
leaves out (`pruner.correction=false`) is passed as `++pruner.correction=false`: Hydra adds it, and
the signature check rejects it by name if the class has no such parameter.
"""
from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path, get_args_parser
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Glob, Override, Sweep
from hydra.errors import OverrideParseException
from omegaconf import DictConfig

from stat_exp.config.validate import top_level_keys
from stat_exp.errors import UserError

# conf/hydra/launcher/*.yaml (basic, the default, too) refine the launcher plug-ins' configs of the same
# name: Hydra merges them onto the plug-in's typed config (so a misspelt launcher field is still an
# error) and warns about it, on every composition (stat-exp and compose_config alike).
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
CONFIG_NAME = "config"


def _args(argv: Sequence[str]) -> argparse.Namespace:
    args, _ = get_args_parser().parse_known_args(list(argv))
    return args


def config_loader(argv: Sequence[str] = ()) -> ConfigLoaderImpl:
    """Hydra's config loader over the same search path `stat-exp <argv>` composes from."""
    args = _args(argv)
    main_dir = args.config_path if args.config_path and os.path.isabs(args.config_path) else (
        str(CONF_DIR / args.config_path) if args.config_path else str(CONF_DIR))
    search_path = create_config_search_path(main_dir)
    if args.config_dir is not None:  # as Hydra adds it: before the structured configs
        search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(args.config_dir)}",
                            anchor=SearchPathQuery(provider="schema"))
    return ConfigLoaderImpl(config_search_path=search_path)


def _searchpath_overrides(argv: Sequence[str]) -> list[str]:
    return [o for o in _args(argv).overrides if o.lstrip("+").startswith("hydra.searchpath")]


def group_options(group: str, argv: Sequence[str] = ()) -> list[str]:
    """The options of a config group, from every config source the command line would use."""
    args = _args(argv)
    loader = config_loader(argv)
    return sorted(loader.get_group_options(group, config_name=args.config_name or CONFIG_NAME,
                                           overrides=_searchpath_overrides(argv)))


def _choices(override: Override) -> list[str]:
    """The option names an override of a group asks for (a sweep's every one; none for glob/range)."""
    value = override.value()
    if isinstance(value, ChoiceSweep):
        items = value.list
    elif isinstance(value, (Sweep, Glob)):
        return []
    else:
        items = [value]
    flat = [x for item in items for x in (item if isinstance(item, list) else [item])]
    return [str(x) for x in flat if x is not None]


def parse_overrides(lines: Sequence[str]) -> list[Override]:
    """Hydra's parse of the overrides; a syntax error is one UserError line naming the override."""
    parser = OverridesParser.create()
    parsed = []
    for line in lines:
        try:
            parsed += parser.parse_overrides([line])
        except OverrideParseException as e:
            raise UserError(f"cannot parse override {line!r}: {str(e).strip().splitlines()[0]} (see "
                            f"https://hydra.cc/docs/advanced/override_grammar/basic)") from None
    return parsed


def check_overrides(argv: Sequence[str]) -> None:
    """Override syntax errors, unknown config-group choices and added top-level keys that the config
    does not know (`+save_models=true`) -> one UserError line naming the valid ones (before Hydra's
    long error, or a run that ignores the key)."""
    args = _args(argv)
    overrides = parse_overrides(args.overrides)
    loader = config_loader(argv)
    repo = loader._parse_overrides_and_create_caching_repo(args.config_name or CONFIG_NAME,
                                                           _searchpath_overrides(argv))[1]
    # an experiment may define top-level keys of its own (which a plain override then sets)
    experiment = any(o.key_or_group == "experiment" and not o.is_delete() for o in overrides)
    for override in overrides:
        group = override.key_or_group
        if override.is_delete() or "." in group:
            continue
        if not repo.group_exists(group):
            added = override.is_add() or override.is_force_add()
            if (added or not experiment) and not override.is_hydra_override() and group not in top_level_keys():
                raise UserError(f"unknown key {group!r} ({override.input_line}); valid top-level keys: "
                                f"{', '.join(top_level_keys())}")
            continue
        valid = sorted(repo.get_group_options(group))
        for choice in _choices(override):
            if choice not in valid:
                raise UserError(f"unknown {group} {choice!r}; valid: {', '.join(valid)}")


def _sweeper_for(argv: Sequence[str]) -> list[str]:
    """`hydra/sweeper=experiment` for a sweep over experiments (or over no experiment): the config
    Hydra composes before such a sweep chose no experiment, so no experiment's own sweeper can be in
    it. A sweep of one experiment uses the sweeper that experiment selects (search_stat: optuna)."""
    args = _args(argv)
    if not args.multirun:
        return []
    overrides = OverridesParser.create().parse_overrides(list(args.overrides))
    if any(o.key_or_group == "hydra/sweeper" for o in overrides):
        return []
    chosen = [o for o in overrides if o.key_or_group == "experiment"]
    if chosen and not chosen[-1].is_sweep_override():
        return []
    return ["hydra/sweeper=experiment"]


def overridable(overrides: Sequence[str]) -> list[str]:
    """Plain `a.b=value` overrides as `++a.b=value` (add when the config file leaves the key to the
    class default); hydra keys, groups and explicit +/++/~ overrides stay as they are."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [f"++{line}" if _leaves_default(o) else line for o, line in zip(parsed, overrides)]


def _leaves_default(override: Override) -> bool:
    return (not (override.is_add() or override.is_force_add() or override.is_delete())
            and "." in override.key_or_group and not override.is_hydra_override() and override.package is None)


def command_line(argv: Sequence[str]) -> list[str]:
    """argv with its overrides made overridable (see `overridable`), flags untouched, and the
    experiment sweeper for sweeps that need it (see `_sweeper_for`) right after the last override:
    Hydra's parser takes overrides only as one run of arguments, so not after a trailing flag."""
    overrides = _args(argv).overrides
    rewritten = dict(zip(overrides, overridable(overrides)))
    line = [rewritten.get(arg, arg) for arg in argv]
    end = max((i + 1 for i, arg in enumerate(argv) if arg in overrides), default=len(argv))
    return line[:end] + _sweeper_for(argv) + line[end:]


def compose_config(overrides: Sequence[str] = (), config_dir: Path = CONF_DIR) -> DictConfig:
    """The config `stat-exp <overrides>` runs, for Python callers (benchmarks, notebooks, tests)."""
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(CONFIG_NAME, overrides=overridable(overrides))
