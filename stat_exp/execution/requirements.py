"""What a pruner asks of a run: one value the runner, the planner and the pipeline read."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Requirements:
    """The data and the execution a pruner needs (a pruner's `requirements`; defaults: layer
    statistics from calibration data, nothing else)."""

    calibration: bool = True  # calibration data at all
    layer_stream: bool = True  # per-layer statistics from the block stream (False: data only in `prepare`)
    factorization: bool = False  # the factorization backend's accumulators
    moments: bool = False  # per-channel mean and variance of the pruned inputs
    dense_targets: bool = False  # with propagate=pruned: the dense model's activations alongside
    whole_model: bool = False  # runs the whole model at once (gradients): no offloading
    examples: int | None = None  # calibration examples `prepare` draws for itself (None: the batches)

    @property
    def layer_statistics(self) -> bool:
        """Whether blocks stream with statistics (else each block is scored from its weights alone)."""
        return self.calibration and self.layer_stream
