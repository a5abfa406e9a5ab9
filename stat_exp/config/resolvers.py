"""Config resolvers the packaged configs use; registered before Hydra composes (stat_exp.run)."""
from __future__ import annotations

import os

from omegaconf import OmegaConf


def jobs_for_memory(gib_per_job: float) -> int:
    """How many jobs of `gib_per_job` GiB fit in this machine's memory, at most one per core, at least one."""
    try:
        total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): one job at a time
        return 1
    return max(1, min(os.cpu_count() or 1, int(total_gib // float(gib_per_job))))


def register_resolvers() -> None:
    """`${stat_exp.jobs_for_memory:8}` (conf/hydra/launcher/joblib.yaml)."""
    OmegaConf.register_new_resolver("stat_exp.jobs_for_memory", jobs_for_memory, replace=True)
