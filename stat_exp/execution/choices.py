"""How a run executes: where block weights live, in which order blocks stream, where factorizations
wait for a global allocation. `auto` choices are resolved from the plan's sizes and the memory the
run may use, so a laptop and a GPU server get different defaults from the same config.

- `offload`: `none` (the whole model on the device), `cpu` (blocks on the host, one on the device
  at a time), `disk` (blocks memory-mapped from safetensors, for models larger than host memory);
  one store class each (`stat_exp.execution.offload.STORES`).
- `stream`: `model` (every batch through all blocks in one forward pass; every block's statistics
  held at once: fastest for small models) or `block` (one block at a time over all batches; the
  calibration set is kept at the block boundary; nothing grows with depth). `model_major` decides
  the order a run actually streams in, for the runner and the planner alike.
- `factors`: `hold`, `spill` or `recompute`; one class each (`stat_exp.execution.factors.FACTORS`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from stat_exp.errors import ConfigError
from stat_exp.execution.factors import FACTORS
from stat_exp.execution.offload import STORES
from stat_exp.execution.sizes import MB, Sizes
from stat_exp.types import PositiveFloat

# Shares of the available memory the `auto` rules let each choice use before switching to the
# bounded alternative: weights must leave room for everything else; statistics or factorizations
# of all blocks may take a quarter; spilled factors half of the free disk.
WEIGHTS_SHARE, HELD_SHARE, DISK_SHARE = 0.7, 0.25, 0.5
STREAMS = ("model", "block")

Offload = Literal[("auto", *STORES)]  # type: ignore[valid-type]
Stream = Literal[("auto", *STREAMS)]  # type: ignore[valid-type]
Factors = Literal[("auto", *FACTORS)]  # type: ignore[valid-type]


@dataclass(frozen=True)
class Resolved:
    """The execution choices a run made (recorded in results.json)."""

    offload: str
    stream: str
    factors: str

    def describe(self) -> str:
        return f"offload={self.offload}, stream={self.stream}, factors={self.factors}"


@dataclass
class ExecutionSpec:
    """The `execution` node of the config (its schema: the config validator checks these types)."""

    offload: Offload = "auto"
    stream: Stream = "auto"
    factors: Factors = "auto"
    dir: str | None = None  # offloaded blocks and spilled factors (null: <run_dir>/offload, removed after)
    device_memory_mb: PositiveFloat | None = None  # memory the run may plan with (null: measured)
    host_memory_mb: PositiveFloat | None = None
    tflops: PositiveFloat | None = None  # throughput the time estimate assumes (null: measured on the CPU)

    def resolve(self, sizes: Sizes, device: torch.device, host_mb: float, device_mb: float, disk_mb: float,
                must_stream_blocks: bool, needs_whole_model: bool) -> Resolved:
        """Fill in the `auto` choices (see the module docstring); reject contradictory explicit ones."""
        weights = (sizes.block_weights + sizes.rest_weights) / MB
        on_cpu = device.type == "cpu"
        offload = self.offload
        if offload == "auto":
            if needs_whole_model or weights < WEIGHTS_SHARE * (host_mb if on_cpu else device_mb):
                offload = "none"
            else:
                offload = "disk" if on_cpu or weights > WEIGHTS_SHARE * host_mb else "cpu"
        resident = STORES[offload].resident
        if needs_whole_model and not resident:
            raise ConfigError(f"execution.offload={offload}: this pruner runs the whole model at once (gradients); "
                              f"use execution.offload=none")
        stats_here = device_mb if not on_cpu else host_mb
        all_stats = sum(b.stats for b in sizes.blocks) / MB
        stream = self.stream
        if stream == "auto":
            stream = "block" if (not resident or must_stream_blocks or all_stats > HELD_SHARE * stats_here) else "model"
        if stream == "model" and (not resident or must_stream_blocks):
            raise ConfigError(f"execution.stream=model needs the whole model resident and dense propagation with a "
                              f"streaming backend (here: offload={offload}); use execution.stream=block")
        heavy = sizes.all_heavy / MB
        factors = self.factors
        if factors == "auto":
            if heavy < HELD_SHARE * stats_here:
                factors = "hold"
            else:
                factors = "spill" if heavy < DISK_SHARE * disk_mb else "recompute"
        return Resolved(offload, stream, factors)


def model_major(stream: str, resident: bool, propagate: str, holds_activations: bool) -> bool:
    """Whether blocks stream model-major (every batch through all blocks at once, every block's
    statistics held) rather than block-major: only with `stream=model`, every block resident, dense
    propagation, and statistics that accumulate (a backend that holds the activations themselves
    streams block by block). The one place this order is decided."""
    if stream not in STREAMS:
        raise ConfigError(f"execution.stream={stream!r}; allowed: {', '.join(STREAMS)}")
    return stream == "model" and resident and propagate == "dense" and not holds_activations
