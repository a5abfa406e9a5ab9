"""Is the calibration large enough for STAT's correction? The FFN correction's error on held-out
calibration batches over its error on the tokens it was fitted to, at each layer's kept count.

The correction of a layer keeping k neurons is a least-squares fit with k unknowns per output: with
too few tokens it fits their noise, and its error on tokens it has not seen grows past its error on
the tokens it was fitted to. The calibration batches are split as they stream (every fourth held
out, `pruner.validation`; all of them still make the fit, so the run's result does not change): the
correction fitted on the fit part alone is scored on the held-out part (scaled to all tokens), and
set against the in-sample error of the correction fitted on all tokens, the quantity of the
calibration-size study (`python -m benchmarks.stat_quality sizes`): about 1 when calibration is
ample, 1.12 at the study's knee, 1.27 at half of it, 1.54 at a quarter. Above `WARN_RATIO` the run
says so in one line.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np
import torch

from stat_exp.factorize.base import Accumulator, Factorization, weighted_gram
from stat_exp.prune.correction import error_curve, ridged_cholesky
from stat_exp.prune.held_out import HeldOutAccumulator

WARN_RATIO = 1.2  # between the study's knee (1.12) and half its tokens (1.27)
KEY = "ffn_heldout_over_fit"


def overfit_curves(acc: Accumulator, W: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor,
                   inside: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(in-sample, held-out) output error of the plain least-squares correction for every keep-count
    k = 0..m of the units in `perm` order (columns weighted by `weights`, as they were pivoted);
    None when the statistics were not split or a part got no batch. `inside`: the in-sample curve,
    when the caller has it already."""
    if not isinstance(acc, HeldOutAccumulator) or not (acc.fit.n_tokens and acc.held_out.n_tokens):
        return None
    fit, held = acc.parts()
    w = weights.to(fit)
    perm = perm.to(fit.device)

    def ordered(G: torch.Tensor) -> torch.Tensor:
        return weighted_gram(G, w, perm)

    V = (W.to(fit) / w)[:, perm]
    if inside is None:
        ones = torch.ones_like(w)
        inside = Factorization(perm=torch.arange(len(w), device=w.device),
                               R=ridged_cholesky(ordered(fit + held), tokens=acc.n_tokens), weights=ones).output_error(V)
    R = ridged_cholesky(ordered(fit), tokens=acc.fit.n_tokens)
    del fit  # the 11,008-wide Grams of a 7B are a GB each: hold no more of them than the curve needs
    outside = error_curve(R, V, ordered(held)) * (acc.n_tokens / acc.held_out.n_tokens)
    return inside, outside


@dataclass
class OverfitCheck:
    """Each layer's (in-sample, held-out) FFN error at the neurons it keeps, summarised for results.json."""

    layers: dict[int, tuple[float, float]] = field(default_factory=dict)

    def add(self, index: int, inside: np.ndarray, outside: np.ndarray, kept: int) -> None:
        """Layer `index` keeps `kept` units; a layer that removes nothing has nothing to check."""
        if inside[kept] > 0:
            self.layers[index] = (float(inside[kept]), float(outside[kept]))

    def summary(self) -> dict:
        """{KEY: {total, median, worst, worst_layer, per_layer}}: `total` is the summed held-out error
        over the summed in-sample error (each priced as the allocation prices it); `per_layer` has
        null where a layer kept every neuron. Empty when nothing was measured."""
        if not self.layers:
            return {}
        ratios = {i: outside / inside for i, (inside, outside) in self.layers.items()}
        worst = max(ratios, key=ratios.__getitem__)
        total = sum(o for _, o in self.layers.values()) / sum(f for f, _ in self.layers.values())
        return {KEY: {"total": round(total, 4), "median": round(statistics.median(ratios.values()), 4),
                      "worst": round(ratios[worst], 4), "worst_layer": worst,
                      "per_layer": [round(ratios[i], 4) if i in ratios else None for i in range(max(ratios) + 1)]}}


def overfit_warning(summary: dict) -> str | None:
    """One line when the measured ratio says the calibration is too small."""
    check = summary.get(KEY)
    if not check or check["total"] <= WARN_RATIO:
        return None
    return (f"calibration looks too small for this model: the FFN correction's held-out error is {check['total']:.2f}x "
            f"its in-sample error (worst layer {check['worst_layer']}: {check['worst']:.2f}x; above {WARN_RATIO} it "
            f"overfits): raise calib.num_examples (auto sizes it from the model)")
