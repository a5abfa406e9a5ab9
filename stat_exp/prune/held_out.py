"""Calibration statistics in two parts, a fit part and a held-out part, from the same single pass.

Every calibration batch goes to one of two accumulators (evenly spread: with share 0.25, every
fourth batch is held out), so a choice that needs validation (a ridge strength, an honest cost
curve) gets held-out tokens without a second pass and without setting data aside for good: the
whole set, the sum of both parts, still makes the final fit.
"""
from __future__ import annotations

import math

import torch

from stat_exp.errors import UserError
from stat_exp.factorize.base import Accumulator, Factorization, pivoted_cholesky, weighted_gram


class HeldOutAccumulator(Accumulator):
    """Routes whole batches (one update each) to `fit` or `held_out`; keeps the held-out sums."""

    def __init__(self, fit: Accumulator, held_out: Accumulator, share: float):
        super().__init__(fit.dim, fit.device)
        self.fit, self.held_out, self.share = fit, held_out, share
        self.updates = 0
        self.held_out_sums = torch.zeros(fit.dim, dtype=torch.float64, device=fit.device)

    def _update(self, x: torch.Tensor) -> None:
        i = self.updates
        held = math.floor((i + 1) * self.share) > math.floor(i * self.share)
        (self.held_out if held else self.fit).update(x)
        if held:
            self.held_out_sums += x.detach().to(self.device, torch.float64).sum(0)
        self.updates += 1

    def parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fit Gram, held-out Gram); one line naming the settings when a part got no batch."""
        if self.fit.n_tokens == 0 or self.held_out.n_tokens == 0:
            raise UserError(
                f"pruner.validation={self.share} leaves {'no' if self.held_out.n_tokens == 0 else 'only held-out'} "
                f"calibration batches to {'hold out' if self.held_out.n_tokens == 0 else 'fit'} "
                f"({self.updates} batches): raise calib.num_examples or lower calib.batch_size")
        return self.fit.gram(), self.held_out.gram()

    def statistic(self) -> torch.Tensor:
        return self.fit.statistic()

    def _check_finite(self) -> None:
        self.fit._check_finite()
        self.held_out._check_finite()

    def _gram(self) -> torch.Tensor:
        return self.fit.gram() + self.held_out.gram()

    def _factorize(self, w: torch.Tensor) -> Factorization:
        perm, R = pivoted_cholesky(weighted_gram(self._gram(), w))
        return Factorization(perm=perm, R=R, weights=w)
