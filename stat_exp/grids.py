"""The jobs of a sweep over experiments that carry their own grids.

Hydra's basic sweeper reads `hydra.sweeper.params` from the config composed before the sweep, so
an experiment chosen *in* the sweep (`-m 'experiment=glob(*paper)'`) contributes no parameters and
runs once. Here every chosen experiment is composed on its own, and its grids are expanded:
`hydra.sweeper.grids` (named cartesian grids, their union: e.g. GLUE models x budgets x pruners,
plus one dense job per model) or else `hydra.sweeper.params` (one grid). Command-line values
replace a grid's value for the same key; identical jobs run once.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from hydra.core.override_parser.types import Override

EXPERIMENT = "experiment"
Grid = Mapping[str, object]


def grids_of(sweeper_cfg: Mapping | None) -> list[Grid]:
    """An experiment's grids from its `hydra.sweeper` node: the named `grids` (a null entry
    removes an inherited grid), else `params` as one grid, else none."""
    sweeper_cfg = sweeper_cfg or {}
    named = sweeper_cfg.get("grids") or {}
    grids = [g for g in named.values() if g]
    params = sweeper_cfg.get("params")
    return grids or ([params] if params else [])


def expand(overrides: Sequence[Override], parse: Callable[[list[str]], list[Override]],
           product: Callable[[list[Override]], list[list[str]]], own_grids: Sequence[Grid],
           experiment_grids: Callable[[str], Sequence[Grid]]) -> list[list[str]]:
    """Every job's override list.

    `overrides`: the sweep's (command line and primary params); `parse` turns "key=value" strings
    into overrides; `product` is the basic sweeper's cartesian product; `own_grids`: the grids of
    the config composed before the sweep (an experiment chosen without sweeping it);
    `experiment_grids(name)`: the grids of one experiment composed on its own."""
    chosen = [o for o in overrides if o.key_or_group == EXPERIMENT and o.is_sweep_override()]
    if not chosen:
        return _unique(_grid_jobs(own_grids, list(overrides), parse, product))
    rest = [o for o in overrides if o.key_or_group != EXPERIMENT]
    jobs = []
    for name in chosen[-1].sweep_string_iterator():
        base = parse([f"{EXPERIMENT}={name}"]) + rest
        jobs += _grid_jobs(experiment_grids(name), base, parse, product)
    return _unique(jobs)


def _grid_jobs(grids: Sequence[Grid], base: list[Override], parse, product) -> list[list[str]]:
    if not grids:
        return product(base)
    given = {o.key_or_group for o in base}  # the command line's keys, "++" or not: they replace the grid's
    jobs = []
    for grid in grids:
        kept = [f"{key}={value}" for key, value in grid.items() if str(key).lstrip("+") not in given]
        jobs += product(parse(kept) + base)
    return jobs


def _unique(jobs: list[list[str]]) -> list[list[str]]:
    seen, out = set(), []
    for job in jobs:
        key = tuple(sorted(job))
        if key not in seen:
            seen.add(key)
            out.append(job)
    return out
