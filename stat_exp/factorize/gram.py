"""`gram`: streamed float64 Gram matrix + pivoted Cholesky (the default backend).

Same pivots and R as a pivoted QR of the activations in exact arithmetic, with memory that does
not depend on the number of calibration tokens.
"""
from __future__ import annotations

import torch

from stat_exp.factorize.base import Accumulator, Backend, Factorization, pivoted_cholesky


class GramAccumulator(Accumulator):
    def __init__(self, dim: int, device: torch.device, block_dtype: torch.dtype):
        super().__init__(dim, device)
        self.block_dtype = block_dtype
        self.G = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def _update(self, x: torch.Tensor) -> None:
        # Each block's product may be formed in float32 (twice as fast on CPUs); the running
        # sum is always float64, so rounding does not grow with the number of blocks.
        xb = x.to(self.device, self.block_dtype)
        self.G += (xb.T @ xb).double()

    def gram(self) -> torch.Tensor:
        return self.G.cpu()

    def factorize(self, weights: torch.Tensor | None = None) -> Factorization:
        w = self._weights(weights)
        Gw = self.G * w.to(self.device)[:, None] * w.to(self.device)[None, :]
        perm, R = pivoted_cholesky(Gw)
        return Factorization(perm=perm.cpu(), R=R.cpu(), weights=w)


class GramBackend(Backend):
    name = "gram"

    def __init__(self, device: str | torch.device = "cpu", block_dtype: str = "float64"):
        super().__init__(device)
        self.block_dtype = getattr(torch, block_dtype)

    def accumulator(self, dim: int) -> GramAccumulator:
        return GramAccumulator(dim, self.device, self.block_dtype)
