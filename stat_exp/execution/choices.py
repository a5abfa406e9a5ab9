"""How a run executes: where block weights live, in which order blocks stream, where factorizations
wait for a global allocation. `auto` choices are resolved from the plan's sizes and the memory the
run may use, so a laptop and a GPU server get different defaults from the same config.

- `offload`: `none` (the whole model on the device), `cpu` (blocks on the host, one on the device
  at a time), `disk` (blocks memory-mapped from safetensors, for models larger than host memory).
- `stream`: `model` (every batch through all blocks in one forward pass; every block's statistics
  held at once: fastest for small models) or `block` (one block at a time over all batches; the
  calibration set is kept at the block boundary; nothing grows with depth).
- `factors`: `hold` (every block's factorizations in memory until the allocation is decided),
  `spill` (to files: memory flat in depth, disk grows), `recompute` (dropped, recomputed in a
  second pass: nothing grows, one more pass over the calibration set).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from stat_exp.errors import ConfigError
from stat_exp.types import PositiveFloat

if TYPE_CHECKING:
    from stat_exp.execution.plan import Sizes

MB = 2**20
# Shares of the available memory the `auto` rules let each choice use before switching to the
# bounded alternative: weights must leave room for everything else; statistics or factorizations
# of all blocks may take a quarter; spilled factors half of the free disk.
WEIGHTS_SHARE, HELD_SHARE, DISK_SHARE = 0.7, 0.25, 0.5


@dataclass(frozen=True)
class Resolved:
    """The execution choices a run made (recorded in results.json)."""

    offload: str
    stream: str
    factors: str

    def describe(self) -> str:
        return f"offload={self.offload}, stream={self.stream}, factors={self.factors}"


Offload = Literal["auto", "none", "cpu", "disk"]
Stream = Literal["auto", "model", "block"]
Factors = Literal["auto", "hold", "spill", "recompute"]


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
                must_stream_blocks: bool, needs_whole_model: bool, prunes: bool) -> Resolved:
        """Fill in the `auto` choices (see the module docstring); reject contradictory explicit ones."""
        weights = (sum(b.weights for b in sizes.blocks) + sizes.rest_weights) / MB
        on_cpu = device.type == "cpu"
        offload = self.offload
        if offload == "auto":
            if needs_whole_model or weights < WEIGHTS_SHARE * (host_mb if on_cpu else device_mb):
                offload = "none"
            else:
                offload = "disk" if on_cpu or weights > WEIGHTS_SHARE * host_mb else "cpu"
        if needs_whole_model and offload != "none":
            raise ConfigError(f"execution.offload={offload}: this pruner runs the whole model at once (gradients); "
                              f"use execution.offload=none")
        stats_here = device_mb if not on_cpu else host_mb
        all_stats = sum(b.stats for b in sizes.blocks) / MB
        stream = self.stream
        if stream == "auto":
            stream = "block" if (offload != "none" or must_stream_blocks or all_stats > HELD_SHARE * stats_here) else "model"
        if stream == "model" and (offload != "none" or must_stream_blocks):
            raise ConfigError(f"execution.stream=model needs the whole model resident and dense propagation with a "
                              f"streaming backend (here: offload={offload}); use execution.stream=block")
        heavy = sum(b.heavy for b in sizes.blocks) / MB
        factors = self.factors
        if factors == "auto":
            if heavy < HELD_SHARE * stats_here:
                factors = "hold"
            else:
                factors = "spill" if heavy < DISK_SHARE * disk_mb else "recompute"
        return Resolved(offload, stream, factors)
