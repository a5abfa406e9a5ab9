"""prune_opt.py's sketch of the calibration activations, for `stat_paper` as released on OPT.

The released script never forms a Gram matrix: for each calibration sequence (one batch of one
2,048-token sequence) it multiplies the activations by an unnormalised Gaussian matrix of 100 rows
(`selectRandNeuron`, `selectRandFC` = np.random.normal(size=(100, 2048))), the same matrix for every
layer of that batch, stacks the 128 sketches and factors them. Since E[G^T G] = 100 I, its pivots and
residuals are about sqrt(100) = 10 times those of the exact statistics, which moves its head/neuron
split rule. `GaussianSketch` feeds a backend's accumulator the sketched batches instead.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from stat_exp.factorize.base import Accumulator, Factorization

SKETCH_ROWS = 100  # prune_opt.py: size / batches = 12800 / 128


def gaussian(rows: int, tokens: int, batch: int, seed: int) -> torch.Tensor:
    """The unnormalised Gaussian (rows x tokens) of calibration batch `batch` (the same for every layer)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch)
    return torch.randn(rows, tokens, generator=g, dtype=torch.float64)


class GaussianSketch(Accumulator):
    """Multiplies each update (one calibration batch of real tokens) by `draw(tokens, batch)` before
    `inner` accumulates it; the Gram and the factorization are `inner`'s, of the sketches."""

    def __init__(self, inner: Accumulator, draw: Callable[[int, int], torch.Tensor]):
        super().__init__(inner.dim, inner.device)
        self.inner, self.draw, self.batches = inner, draw, 0

    def _update(self, x: torch.Tensor) -> None:
        G = self.draw(x.shape[0], self.batches).to(x.device)
        self.inner.update(G @ x.double())
        self.batches += 1

    def statistic(self) -> torch.Tensor:
        return self.inner.statistic()

    def _gram(self) -> torch.Tensor:
        return self.inner.gram()

    def _factorize(self, w: torch.Tensor) -> Factorization:
        return self.inner.factorize(w)


def sketched(make: Callable[[int], Accumulator], seed: int = 0, rows: int = SKETCH_ROWS) -> Callable[[int], Accumulator]:
    """An accumulator factory like `make` whose accumulators see prune_opt.py's sketches."""
    return lambda dim: GaussianSketch(make(dim), lambda tokens, batch: gaussian(rows, tokens, batch, seed))
