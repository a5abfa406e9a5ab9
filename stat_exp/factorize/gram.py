"""`gram`: streamed float64 Gram matrix + pivoted Cholesky (the default backend).

Same pivots and R as a pivoted QR of the activations in exact arithmetic, with memory that does
not depend on the number of calibration tokens.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import blas

from stat_exp.factorize.base import Accumulator, Backend, Factorization, pivoted_cholesky

_SYRK = {torch.float32: blas.ssyrk, torch.float64: blas.dsyrk}


class GramAccumulator(Accumulator):
    def __init__(self, dim: int, device: torch.device, block_dtype: torch.dtype):
        super().__init__(dim, device)
        self.block_dtype = block_dtype
        self.G = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self._upper_only = False  # CPU blocks add only the upper triangle (symmetric rank-k update)

    def _update(self, x: torch.Tensor) -> None:
        # Each block's product may be formed in float32 (twice as fast); the running sum is
        # always float64, so rounding does not grow with the number of blocks.
        xb = x.to(self.device, self.block_dtype)
        if xb.device.type == "cpu":
            self.G += torch.from_numpy(_SYRK[self.block_dtype](1.0, np.asarray(xb.T), trans=0))
            self._upper_only = True
        else:
            self.G += (xb.T @ xb).double()

    def statistic(self) -> torch.Tensor:
        return self.G

    def _gram(self) -> torch.Tensor:
        if self._upper_only:
            self.G = torch.triu(self.G) + torch.triu(self.G, 1).T
            self._upper_only = False
        return self.G

    def _factorize(self, w: torch.Tensor) -> Factorization:
        w_dev = w.to(self.device)
        perm, R = pivoted_cholesky(self._gram() * w_dev[:, None] * w_dev[None, :])
        return Factorization(perm=perm.cpu(), R=R.cpu(), weights=w)


class GramBackend(Backend):
    name = "gram"

    def __init__(self, device: str | torch.device = "cpu", block_dtype: str = "float32"):
        super().__init__(device)
        if block_dtype not in ("float32", "float64"):
            raise ValueError(f"factorization.block_dtype={block_dtype!r}; allowed: float32, float64")
        self.block_dtype = getattr(torch, block_dtype)

    def accumulator(self, dim: int) -> GramAccumulator:
        return GramAccumulator(dim, self.device, self.block_dtype)
