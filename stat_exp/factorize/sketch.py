"""`sketch`: randomized ID. Token rows are compressed by a random sketch S while streaming; the
pivoted QR then runs on S A (rows x units), whose size does not depend on the token count.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from annotated_types import Ge

from stat_exp.factorize.base import FLOAT64_BYTES, Accumulator, Backend, Factorization, pivoted_qr

SketchKind = Literal["gaussian", "countsketch"]


class SketchAccumulator(Accumulator):
    def __init__(self, dim: int, device: torch.device, rows: int, kind: str, generator: torch.Generator):
        super().__init__(dim, device)
        self.kind = kind
        self.rows = rows
        self.gen = generator
        self.Y = torch.zeros(rows, dim, dtype=torch.float64, device=device)

    def _update(self, x: torch.Tensor) -> None:
        x = x.to(self.device, torch.float64)
        n = x.shape[0]
        if self.kind == "gaussian":
            S = torch.randn(self.rows, n, generator=self.gen, dtype=torch.float64, device=self.device)
            self.Y += (S / math.sqrt(self.rows)) @ x
        else:  # countsketch: every token row lands in one bucket with a random sign
            bucket = torch.randint(self.rows, (n,), generator=self.gen, device=self.device)
            sign = torch.randint(2, (n, 1), generator=self.gen, dtype=torch.float64, device=self.device) * 2 - 1
            self.Y.index_add_(0, bucket, x * sign)

    def statistic(self) -> torch.Tensor:
        return self.Y

    def _gram(self) -> torch.Tensor:
        return self.Y.T @ self.Y

    def _factorize(self, w: torch.Tensor) -> Factorization:
        perm, R = pivoted_qr(self.Y * w)
        return Factorization(perm=perm, R=R, weights=w)


class SketchBackend(Backend):
    name = "sketch"

    def __init__(self, device: str | torch.device = "cpu", kind: SketchKind = "gaussian",
                 rows_per_unit: Annotated[float, Ge(1)] = 1.5, seed: int = 0):
        """`rows_per_unit`: sketch rows per unit (at least one: rows >= units)."""
        super().__init__(device)
        self.kind = kind
        self.rows_per_unit = rows_per_unit
        self.gen = torch.Generator(device=self.device).manual_seed(seed)

    def statistics_bytes(self, dim: int, tokens: int) -> int:
        return math.ceil(self.rows_per_unit * dim) * dim * FLOAT64_BYTES

    def accumulator(self, dim: int) -> SketchAccumulator:
        return SketchAccumulator(dim, self.device, math.ceil(self.rows_per_unit * dim), self.kind, self.gen)
