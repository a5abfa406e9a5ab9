"""`qr`: column-pivoted QR (LAPACK geqp3) of the stored activation matrix, as in the paper's code.

Holds every calibration activation of one layer (on the statistics' device) until it is
factorized; use `gram` when that does not fit.
"""
from __future__ import annotations

import torch

from stat_exp.factorize.base import FLOAT64_BYTES, Accumulator, Backend, Factorization, pivoted_qr


class ActivationAccumulator(Accumulator):
    def __init__(self, dim: int, device: torch.device):
        super().__init__(dim, device)
        self.blocks: list[torch.Tensor] = []

    def _update(self, x: torch.Tensor) -> None:
        self.blocks.append(x.detach().to(self.device, torch.float64))

    def matrix(self) -> torch.Tensor:
        return torch.cat(self.blocks) if self.blocks else torch.zeros(0, self.dim, dtype=torch.float64, device=self.device)

    def statistic(self) -> torch.Tensor:
        return self.matrix()

    def _gram(self) -> torch.Tensor:
        A = self.matrix()
        return A.T @ A

    def _factorize(self, w: torch.Tensor) -> Factorization:
        perm, R = pivoted_qr(self.matrix() * w)
        return Factorization(perm=perm, R=R, weights=w)


class QRBackend(Backend):
    name = "qr"
    holds_activations = True

    def statistics_bytes(self, dim: int, tokens: int) -> int:
        return tokens * dim * FLOAT64_BYTES  # the activations themselves

    def accumulator(self, dim: int) -> ActivationAccumulator:
        return ActivationAccumulator(dim, self.device)
