"""`hydra/sweeper=experiment` (the default in stat_exp/conf/config.yaml): Hydra's basic sweeper, with
every experiment chosen in the sweep expanded over its own grids (stat_exp.grids), and `dry_run=true`
listing every job instead of launching any (stat_exp.dry_run). Hydra loads sweepers only from the
`hydra_plugins` package."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import OmegaConf

from stat_exp.dry_run import sweep_job
from stat_exp.errors import UserError, first_line
from stat_exp.exits import user_error
from stat_exp.grids import expand, grids_of


class ExperimentSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: Mapping[str, str] | None = None,
                 grids: Mapping[str, Mapping[str, Any] | None] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = grids

    def sweep(self, arguments: list[str]) -> Any:
        if not OmegaConf.select(self.config, "dry_run"):
            return super().sweep(arguments)
        loader = self.hydra_context.config_loader
        overrides = OverridesParser.create(config_loader=loader).parse_overrides(self._parse_config() + list(arguments))
        bad = 0
        for num, job in enumerate(j for batch in self.split_arguments(overrides, None) for j in batch):
            try:
                line = sweep_job(loader.load_sweep_config(self.config, list(job)), num)
            except (UserError, HydraException) as err:  # a bad value, or an override the config cannot take
                bad += 1
                line = f"#{num} dry run: error: {first_line(user_error(err) or err)} ({' '.join(job)})"
            print(line, flush=True)
        if bad:
            raise SystemExit(2)
        return []

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        """All jobs (BasicSweeper.sweep calls this with the parsed overrides), in batches."""
        loader = self.hydra_context.config_loader
        parser = OverridesParser.create(config_loader=loader)

        def product(base: list[Override]) -> list[list[str]]:
            return BasicSweeper.split_arguments(base, None)[0]

        def experiment_grids(name: str) -> list:
            cfg = loader.load_sweep_config(self.config, [f"experiment={name}"])
            return grids_of(OmegaConf.to_container(cfg.hydra.sweeper, resolve=False))

        own = grids_of({"grids": OmegaConf.to_container(OmegaConf.create(self.grids or {}))})
        jobs = expand(overrides, parser.parse_overrides, product, own, experiment_grids)
        step = max_batch_size or len(jobs) or 1
        return [jobs[i:i + step] for i in range(0, len(jobs), step)]
