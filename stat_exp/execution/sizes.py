"""What a run holds, in bytes, from shapes alone: the planner fills these in, and each execution
mode (a block store, a factors mode) states its footprint from them."""
from __future__ import annotations

from dataclasses import dataclass

MB = 2**20
FLOAT64 = 8


@dataclass
class BlockSizes:
    """Bytes one block needs at each step (see `stat_exp.execution.plan.plan_sizes`)."""

    weights: int
    stats: int  # statistics held while the block streams
    score_work: int  # working memory of scoring (factorizations being formed)
    heavy: int  # what a scored block keeps until it is pruned (its factorizations)
    activations: int  # one calibration batch through the block


@dataclass
class Sizes:
    blocks: list[BlockSizes]
    rest_weights: int  # embeddings, final norm, head
    hidden: int  # the calibration set at one block boundary, model dtype
    eval_work: int  # one evaluation batch's logits
    tokens: int
    calibration_flops: float  # one dense forward of the calibration set through the blocks
    gram_flops: float
    factor_flops: float  # m^3 / 3 per factorized width
    pivot_steps: int  # columns the pivoted factorizations step through
    down_flops: float = 0.0  # the down projections' share of the forward (a statistics-only run stops before them)
    curve_flops: float = 0.0  # the error curves, V R^T over R's upper triangle, and held-out curves where split
    fold_flops: float = 0.0  # corrections and folds at half the units kept (their most expensive count)
    selection: int = 0  # choosing the plan on held-out batches: their hidden-state streams and one block copy
    selection_flops: float = 0.0
    selection_folds: int = 0  # candidate plans the choice applies to a copy of every block (a fold each)

    @property
    def block_weights(self) -> int:
        return sum(b.weights for b in self.blocks)

    @property
    def biggest_block(self) -> int:
        return max(b.weights for b in self.blocks)

    @property
    def all_heavy(self) -> int:
        return sum(b.heavy for b in self.blocks)


@dataclass(frozen=True)
class Footprint:
    """Bytes an execution mode puts on the device, on the host and on disk."""

    device: int = 0
    host: int = 0
    disk: int = 0
