"""`gram`: streamed float64 Gram matrix + pivoted Cholesky (the default backend).

Same pivots and R as a pivoted QR of the activations in exact arithmetic, with memory that does
not depend on the number of calibration tokens.
"""
from __future__ import annotations

from typing import Literal

import torch

from stat_exp.factorize.base import (Accumulator, Backend, Factorization, full_precision_matmul, pivoted_cholesky,
                                     weighted_gram)

TILE_MIN = 192  # diagonal tiles at least twice this wide are split further


def _upper_tiles(dim: int, start: int = 0) -> list[tuple[slice, slice]]:
    """Tiles covering the upper triangle of a dim x dim Gram, by recursive halving of the
    diagonal blocks: 1536 wide -> 15 tiles, 56% of the full product's work.

    Plain torch matmuls on purpose: scipy's syrk would halve the work, but its OpenBLAS threads
    spin between calls and fight torch's for the cores while calibration interleaves the two
    (measured: the model's own matmuls ran ~1.7x slower on 2 cores).
    """
    whole = slice(start, start + dim)
    if dim < 2 * TILE_MIN:
        return [(whole, whole)]
    half = dim // 2
    top, bottom = slice(start, start + half), slice(start + half, start + dim)
    return [(top, bottom), *_upper_tiles(half, start), *_upper_tiles(dim - half, start + half)]


class GramAccumulator(Accumulator):
    def __init__(self, dim: int, device: torch.device, block_dtype: torch.dtype, pivoting: str = "auto"):
        super().__init__(dim, device)
        self.block_dtype, self.pivoting = block_dtype, pivoting
        self.G = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # upper tiles until _gram()
        self._tiles = _upper_tiles(dim)
        self._mirrored = False  # whether G is the full symmetric Gram (until the next update)

    def _update(self, x: torch.Tensor) -> None:
        # Each block's product may be formed in float32 (twice as fast); the running sum is
        # always float64, so rounding does not grow with the number of blocks.
        xb = x.to(self.device, self.block_dtype)
        self._mirrored = False
        with full_precision_matmul():
            for rows, cols in self._tiles:
                self.G[rows, cols] += xb[:, rows].T @ xb[:, cols]

    def statistic(self) -> torch.Tensor:
        return self.G

    def _finite_witness(self) -> torch.Tensor:
        """The diagonal: an inf or nan activation of unit j makes G_jj inf or nan (a sum of squares),
        and |G_ij| <= sqrt(G_ii G_jj) bounds the rest, so the 1 GB Gram of a 7B's FFN is not scanned."""
        return self.G.diagonal()

    def _gram(self) -> torch.Tensor:
        """The upper triangle mirrored: exactly symmetric, whatever the lower tiles hold (once
        between updates: each mirror writes a new Gram)."""
        if not self._mirrored:
            self.G = torch.triu(self.G) + torch.triu(self.G, 1).T
            self._mirrored = True
        return self.G

    def _factorize(self, w: torch.Tensor) -> Factorization:
        perm, R = pivoted_cholesky(weighted_gram(self._gram(), w), self.pivoting)
        return Factorization(perm=perm, R=R, weights=w)


class GramBackend(Backend):
    name = "gram"

    def __init__(self, device: str | torch.device = "cpu", block_dtype: Literal["float32", "float64"] = "float32",
                 pivoting: Literal["auto", "lapack", "blocked"] = "auto"):
        """`block_dtype`: dtype of each batch's X^T X before it joins the float64 running sum
        (float64: slower, exact). `pivoting`: the pivoted Cholesky (`factorize.base.pivoted_cholesky`;
        `blocked` runs the accelerators' torch path on any device)."""
        super().__init__(device)
        self.block_dtype, self.pivoting = getattr(torch, block_dtype), pivoting

    def accumulator(self, dim: int) -> GramAccumulator:
        return GramAccumulator(dim, self.device, self.block_dtype, self.pivoting)
