"""`hydra/sweeper=optuna` as stat_exp's configs select it (stat_exp/conf/hydra/sweeper/optuna.yaml): a
search whose every trial failed ends like any failed sweep, with its report, failed list and exit 1,
not with optuna's "no trials are completed yet" traceback. A failed or killed trial returns None, which
the plug-in records as a failed trial."""
from __future__ import annotations

import logging
from pathlib import Path

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger(__name__)


class OptunaSearch(OptunaSweeper):
    def sweep(self, arguments: list[str]) -> None:
        from stat_exp.track.report import outcome

        try:
            return super().sweep(arguments)
        except ValueError:
            result = outcome(Path(str(self.sweeper.config.hydra.sweep.dir)))
            if result.jobs and len(result.failed) == result.jobs:
                log.error("optuna: every trial failed, so there is no best one")
                return None
            raise
