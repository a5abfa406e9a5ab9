"""`hydra/sweeper=experiment` (the default in stat_exp/conf/config.yaml): Hydra's basic sweeper, with
every experiment chosen in the sweep expanded over its own grids. Hydra loads sweepers only from the
`hydra_plugins` package; the logic lives in stat_exp.grids."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf

from stat_exp.grids import expand, grids_of


class ExperimentSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: Mapping[str, str] | None = None,
                 grids: Mapping[str, Mapping[str, Any] | None] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.grids = grids

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
