"""`stat`: STAT, structured pruning by interpolative decomposition with a folded-in correction.

FFN: a column-pivoted factor of the hidden activations, columns weighted by the norms of their
output weights, ranks the neurons; the removed neurons are reconstructed from the kept ones,
Z_removed ~= Z_kept T, and T is folded into the down projection.
Heads: whole heads (or KV groups) are ranked by pivoting on their contributions after W_O
(`heads=pivot`) or removed greedily by the corrected error they add (`heads=greedy`); the
least-squares map from the kept head channels to the removed ones is folded into W_O.
The cost of a keep-count is the exact output error the corrected layer adds, relative to the
typical energy of the residual stream it is added to (n_tokens x the median token's squared norm),
so costs compare across layers. The median matters: from some block on, a few tokens carry massive
activations that dominate the summed energy (100x in SmolLM2 from block 12) and would make every
later block look cheap to prune. Where a family normalises a sublayer's output before adding it
(Gemma 2 and later: x + post_norm(attn(x))), the error is priced after that norm: scaled by the
norm's measured squared gain (`calibrate.NormGain`), so a sublayer's raw output scale, which the
norm removes, does not decide what it keeps.

Options (each measured in benchmarks/stat_quality.py): `ridge` shrinks the correction toward plain
slicing, a fixed strength or `auto` (chosen per keep-count on held-out calibration batches);
`intercept` adds a mean term folded into the output bias; `costs=held_out` prices keep-counts by
the error on held-out calibration batches instead of on the tokens the correction was fitted to.
Each way of fitting (as published, with options, compensated) is a strategy of `folds`, chosen
once when a layer is scored; `apply` folds in whichever it was given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from stat_exp.calibrate import ChannelMoments, LayerStats
from stat_exp.errors import ConfigError
from stat_exp.execution.requirements import Requirements
from stat_exp.factorize.base import Accumulator, Backend, Factorization, RankError, pivoted_cholesky, weighted_gram
from stat_exp.factorize.gram import GramBackend
from stat_exp.models.base import ModelAdapter
from stat_exp.prune.base import AllocationChoice, Pruner
from stat_exp.prune.budget import LayerPlan
from stat_exp.prune.calibration_check import OverfitCheck, overfit_curves
from stat_exp.prune.compensation import CompensatedFold, CompensatedHeadFold, compensated_error
from stat_exp.prune.correction import JITTER, ModuleGrams, error_curve, ridged_cholesky
from stat_exp.prune.folds import HeadFold, NeuronFold, PivotedFold, PivotedHeadFold, StatFolds, channels
from stat_exp.prune.head_selection import corrected_error, greedy_levels
from stat_exp.prune.held_out import HeldOutAccumulator
from stat_exp.prune.scores import AttentionLevel, LayerScores, attention_levels, attention_units
from stat_exp.prune.surgery import head_channels, prune_attention, prune_ffn
from stat_exp.types import GqaMode, NonNegativeFloat, OpenFraction

RIDGES = (0.0, 0.03, 0.1, 0.3, 1.0)  # the strengths `ridge=auto` chooses from (relative to each unit's energy)


def nested_head_factor(levels: list[AttentionLevel], G: torch.Tensor, head_dim: int
                       ) -> tuple[Factorization, list[int]]:
    """Factor of the head-channel Gram `G` with channels in the levels' nested head order, so that
    every level's corrected error is a suffix sum; and the kept channel count of each level."""
    order, bounds, seen = [], [], set()
    for lv in levels:
        order += [h for h in lv.heads if h not in seen]
        seen.update(lv.heads)
        bounds.append(len(order) * head_dim)
    perm = head_channels(order, head_dim).to(G.device)
    R = ridged_cholesky(G[perm][:, perm])
    ones = torch.ones(len(perm), dtype=torch.float64, device=G.device)
    return Factorization(perm=perm, R=R, weights=ones), bounds


@dataclass
class StatState:
    """What `apply` checks of one layer: its calibration tokens (the correction needs one per kept
    unit) and, when measured, the FFN's (in-sample, held-out) error curves, priced as its costs."""

    n_tokens: int
    ffn_overfit: tuple[np.ndarray, np.ndarray] | None = None


class StatPruner(Pruner):
    name = "stat"
    requirements = Requirements(factorization=True)

    def __init__(self, gqa: GqaMode = "per_group", correction: bool = True,
                 allocation: AllocationChoice = "budget", ridge: NonNegativeFloat | Literal["auto"] = 0.0,
                 validation: OpenFraction = 0.25, heads: Literal["pivot", "greedy"] = "pivot",
                 intercept: bool = False, costs: Literal["fit", "held_out"] = "fit", compensate: bool = False,
                 overfit_check: bool = True):
        """`correction=False`: the ablation "same selection, no correction". `ridge`: strength of the
        ridge on the correction, relative to each kept unit's energy (0: plain least squares), or
        `auto`: chosen from RIDGES for every keep-count by the error on held-out calibration batches.
        `validation`: the share of calibration batches held out for `ridge=auto` and
        `costs=held_out` (all batches still make the final fit). `compensate`: blocks are fed the
        pruned model's outputs (propagate=pruned) and each correction is fitted to the dense model's
        outputs on the same tokens (see `compensation`). `overfit_check`: measure whether the
        calibration is large enough for the FFN correction (held-out over in-sample error, results.json
        `calibration`; see `calibration_check`). Types and ranges are checked before a job starts
        (stat_exp.config)."""
        super().__init__(gqa, allocation, propagate="pruned" if compensate else "calib")
        if compensate and (ridge == "auto" or intercept or costs == "held_out"):
            raise ConfigError("pruner.compensate=true fits to the dense outputs with a fixed ridge only; "
                              "it does not combine with ridge=auto, intercept=true or costs=held_out")
        self.correction, self.ridge, self.validation = correction, ridge, validation
        self.heads, self.intercept, self.costs, self.compensate = heads, intercept, costs, compensate
        # channel sums for the mean term; the dense model's activations for a compensated fit
        self.requirements = Requirements(factorization=True, moments=intercept, dense_targets=compensate)
        self.overfit_check = overfit_check and not compensate
        self._check = OverfitCheck()

    @property
    def corrects(self) -> bool:
        return self.correction

    @property
    def variant(self) -> str:
        parts = ["" if self.correction else "no correction", f"ridge {self.ridge}" if self.ridge else "",
                 "greedy heads" if self.heads == "greedy" else "", "intercept" if self.intercept else "",
                 "held-out costs" if self.costs == "held_out" else "", "compensated" if self.compensate else ""]
        return ", ".join(p for p in parts if p)

    @property
    def _held_out(self) -> bool:
        return self.ridge == "auto" or self.costs == "held_out"

    @property
    def _plain(self) -> bool:
        """Today's method exactly: one pivoted factor per module, costs and folds from it."""
        return not (self.ridge or self.intercept or self._held_out or self.heads == "greedy")

    def splits_statistics(self, backend: Backend) -> bool:
        """Held-out choices split any backend's statistics; the check alone only the Gram backend's,
        whose two parts sum to the same statistic (so the run's result does not change)."""
        return self._held_out or (self.overfit_check and isinstance(backend, GramBackend))

    def accumulator(self, backend: Backend):
        if not self.splits_statistics(backend):
            return backend.accumulator
        return lambda dim: HeldOutAccumulator(backend.accumulator(dim), backend.accumulator(dim), self.validation)

    def score(self, adapter: ModelAdapter, index: int, layer: nn.Module, stats: LayerStats | None) -> LayerScores:
        return self._scores(adapter, index, layer, stats, priced=True)

    def score_for_plan(self, adapter: ModelAdapter, index: int, layer: nn.Module,
                       stats: LayerStats | None) -> LayerScores:
        """Order and folds without the cost curves (as costly as the factorization itself), which
        nothing reads once the counts are decided; zero costs stand in (the plain method; the
        options still price)."""
        return self._scores(adapter, index, layer, stats, priced=False)

    def _scores(self, adapter: ModelAdapter, index: int, layer: nn.Module, stats: LayerStats | None,
                priced: bool) -> LayerScores[StatState, StatFolds]:
        """The layer's folds, chosen here once, and their costs priced into the residual stream."""
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        scale = max(stats.typical_energy, 1e-300)
        W2 = ffn.down.weight.detach().double()  # everything below stays on the statistics' device
        if stats.ffn_cross is not None:  # fed the pruned model's inputs: fit to the dense outputs
            folds, ffn_order, levels, curves = self._compensated_folds(attn, W2, stats)
        elif self._plain:
            folds, ffn_order, levels, curves = self._pivoted_folds(attn, W2, stats, priced)
        else:
            folds, ffn_order, levels, curves = self._option_folds(attn, W2, stats)
        # priced where the error enters the residual stream: through the sublayer's post-norm, if any
        ffn_price, attn_price = stats.ffn_gain.value / scale, stats.attn_gain.value / scale
        overfit = None if curves is None else tuple((c * ffn_price).cpu().numpy() for c in curves)
        return LayerScores(ffn_order=ffn_order.cpu(), ffn_cost=(folds.ffn.cost() * ffn_price).cpu().numpy(),
                           attn_levels=levels, attn_cost=(folds.attn.cost() * attn_price).cpu().numpy(),
                           state=StatState(stats.n_tokens, overfit), heavy=folds,
                           ffn_held_out_cost=None if overfit is None else overfit[1])

    def _compensated_folds(self, attn, W2: torch.Tensor, stats: LayerStats):
        """Both modules refitted to the dense model's outputs (no overfit curves: the check is off)."""
        fold = CompensatedFold(stats.ffn_factor.gram(), stats.ffn_cross.C, W2, _unit_weights(W2),
                               stats.ffn_factor.factorize(weights=_unit_weights(W2)).perm, float(self.ridge))
        heads = self._compensated_heads(attn, stats)
        return StatFolds(fold, heads), fold.perm, heads.levels, None

    def _pivoted_folds(self, attn, W2: torch.Tensor, stats: LayerStats, priced: bool):
        """Today's method exactly: one pivoted factor per module, costs and folds from it (zero
        costs, and no overfit curves, where not `priced`)."""
        ffn_fact = stats.ffn_factor.factorize(weights=W2.norm(dim=0))
        attn_fact, levels, bounds = self._head_factorization(attn, stats.attn_factor.gram())
        curves = None
        if priced:
            ffn_cost = ffn_fact.output_error(W2)
            attn_cost = attn_fact.output_error(attn.o.weight.detach().double())[bounds]
            curves = self._overfit_curves(stats, W2, ffn_fact.perm, ffn_fact.weights, ffn_cost)
        else:
            ffn_cost, attn_cost = W2.new_zeros(W2.shape[1] + 1), W2.new_zeros(len(levels))
        folds = StatFolds(PivotedFold(ffn_fact, ffn_cost, self.correction),
                          PivotedHeadFold(attn_fact, levels, attn.head_dim, attn_cost, self.correction))
        return folds, ffn_fact.perm, levels, curves

    def _option_folds(self, attn, W2: torch.Tensor, stats: LayerStats):
        """Ridge (fixed or chosen per count), intercept, held-out costs, greedy heads."""
        grams = self._grams(stats.ffn_factor, stats.ffn)
        ffn_fold = self._ffn_fold(W2.to(grams.full.device), grams)
        head_fold = self._head_folds(attn, self._grams(stats.attn_factor, stats.attn))
        curves = self._overfit_curves(stats, W2, ffn_fold.perm, ffn_fold.weights)
        return StatFolds(ffn_fold, head_fold), ffn_fold.perm, head_fold.levels, curves

    def _overfit_curves(self, stats: LayerStats, W2: torch.Tensor, perm: torch.Tensor, weights: torch.Tensor,
                        inside: torch.Tensor | None = None):
        return overfit_curves(stats.ffn_factor, W2, perm, weights, inside) if self.overfit_check else None

    def calibration_report(self) -> dict:
        return self._check.summary()

    def _grams(self, acc: Accumulator, moments: ChannelMoments | None) -> ModuleGrams:
        full = acc.gram()
        sums = moments.sum.double().to(full.device) if self.intercept else None
        grams = ModuleGrams(full, acc.n_tokens, sums)
        if isinstance(acc, HeldOutAccumulator):
            grams.fit, grams.held_out = acc.parts()
            grams.held_out_sums, grams.n_held_out = acc.held_out_sums.to(full.device), acc.held_out.n_tokens
        return grams.centred()

    def _head_factorization(self, attn, G: torch.Tensor):
        """Rank heads (or KV groups) by pivoting on their contributions after W_O, then factor the
        head-channel Gram in that nested order so every level's corrected error is a suffix sum."""
        W = attn.o.weight.detach().double().to(G.device)
        units = attention_units(attn.num_heads, attn.num_kv_heads, self.gqa)
        member = torch.zeros(G.shape[0], len(units), dtype=G.dtype, device=G.device)  # channel -> its unit
        for j, u in enumerate(units):
            member[head_channels(u, attn.head_dim).to(G.device), j] = 1.0
        C = member.T @ ((W.T @ W) * G) @ member  # <O_a W_a^T, O_b W_b^T> summed per unit pair
        eye = torch.eye(len(units), dtype=C.dtype, device=C.device)
        unit_order, _ = pivoted_cholesky(C + JITTER * float(C.trace()) * eye)
        levels = attention_levels(unit_order.tolist(), attn.num_heads, attn.num_kv_heads, self.gqa)
        fact, bounds = nested_head_factor(levels, G, attn.head_dim)
        return fact, levels, bounds

    def _ffn_fold(self, W2: torch.Tensor, grams: ModuleGrams) -> NeuronFold:
        """Neuron order (pivoted on the weighted Gram), the fold of every keep-count, and its cost."""
        w = _unit_weights(W2)
        perm, R0 = pivoted_cholesky(weighted_gram(grams.full, w))
        g = grams.scaled(w, perm)
        V = (W2 / w)[:, perm]
        if self.ridge == "auto":
            curves = torch.stack([error_curve(ridged_cholesky(g.fit, r), V, g.held_out) for r in RIDGES])
            ridge_at = [RIDGES[i] for i in curves.argmin(0).tolist()]
            held_out = curves.min(0).values
        else:
            ridge_at = [float(self.ridge)] * (len(perm) + 1)
            held_out = error_curve(ridged_cholesky(g.fit, self.ridge), V, g.held_out) if self._held_out else None
        if self.costs == "held_out":
            cost = held_out * grams.n / grams.n_held_out
        elif self.ridge and self.ridge != "auto":
            cost = error_curve(ridged_cholesky(g.full, self.ridge), V, g.full)
        else:  # the plain least squares on all tokens: suffix sums of its own factor
            cost = Factorization(perm=torch.arange(len(perm), device=w.device), R=R0,
                                 weights=torch.ones_like(w)).output_error(V)
        return NeuronFold(perm, w, g.full, ridge_at, grams.mean, cost, self.correction)

    def _head_folds(self, attn, grams: ModuleGrams) -> HeadFold:
        """Levels (pivoted, or greedy where that pays less), each level's cost, and its fold ridge."""
        W = attn.o.weight.detach().double().to(grams.full.device)
        _, levels, _ = self._head_factorization(attn, grams.full)
        if self.heads == "greedy":
            per_group = self.gqa == "per_group"
            greedy, greedy_costs = greedy_levels(grams.full, W, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                                 per_group)
            pivot_costs = [self._level_error(attn, grams.full, W, lv) for lv in levels]
            levels = [g if gc < pc else p for g, gc, p, pc in zip(greedy, greedy_costs, levels, pivot_costs)]
        costs, ridges = [], []
        for lv in levels:
            kept, removed = _channels(attn, lv, W.device)
            options = RIDGES if self.ridge == "auto" else (float(self.ridge),)
            held = [corrected_error(grams.fit, W, kept, removed, r, grams.held_out) for r in options] \
                if self._held_out else None
            ridge = options[int(np.argmin(held))] if self.ridge == "auto" else options[0]
            if self.costs == "held_out":
                costs.append(min(held) * grams.n / grams.n_held_out)
            else:
                costs.append(corrected_error(grams.full, W, kept, removed, ridge))
            ridges.append(ridge)
        return HeadFold(grams.full, levels, attn.num_heads, attn.head_dim, ridges, grams.mean,
                        torch.tensor(costs, dtype=torch.float64), self.correction)

    def _compensated_heads(self, attn, stats: LayerStats) -> CompensatedHeadFold:
        """Head levels ranked on the pruned inputs; each level's error against the dense outputs,
        relative to keeping every head."""
        G, C = stats.attn_factor.gram(), stats.attn_cross.C
        W = attn.o.weight.detach().double().to(G.device)
        if self.heads == "greedy":
            levels, _ = greedy_levels(G, W, attn.num_heads, attn.num_kv_heads, attn.head_dim, self.gqa == "per_group")
        else:
            _, levels, _ = self._head_factorization(attn, G)
        errors = torch.tensor([compensated_error(G, C, W, _channels(attn, lv, G.device)[0], float(self.ridge))
                               for lv in levels], dtype=torch.float64)
        return CompensatedHeadFold(G, C, levels, attn.num_heads, attn.head_dim, float(self.ridge), errors - errors[-1])

    def _level_error(self, attn, G, W, level: AttentionLevel) -> float:
        kept, removed = _channels(attn, level, G.device)
        return corrected_error(G, W, kept, removed)

    def apply(self, adapter: ModelAdapter, index: int, layer: nn.Module, scores: LayerScores[StatState, StatFolds],
              plan: LayerPlan, stats: LayerStats | None) -> None:
        """Slice to the plan and fold in the correction of the folds chosen when the layer was scored."""
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        n_tokens = scores.state.n_tokens
        level = scores.attn_levels[plan.attn_level]
        k_attn = level.num_heads * attn.head_dim
        for what, k in (("neurons", plan.neurons), ("head channels", k_attn)):
            if self.correction and k < (ffn.width if what == "neurons" else attn.o.in_features) and n_tokens < k:
                raise RankError(
                    f"calibration has {n_tokens} tokens but a layer keeps {k} {what}: the correction needs "
                    f"at least as many tokens as kept units (raise calib.num_examples or calib.seq_len)")
        if scores.state.ffn_overfit is not None:
            self._check.add(index, *scores.state.ffn_overfit, plan.neurons)
        o_weight, o_bias = scores.heavy.attn.weight(attn.o, plan.attn_level)
        down_weight, down_bias = scores.heavy.ffn.weight(ffn.down, plan.neurons)
        prune_attention(adapter, layer, level, o_weight, o_bias)
        prune_ffn(adapter, layer, scores.ffn_order[: plan.neurons], down_weight, down_bias)


def _unit_weights(W: torch.Tensor) -> torch.Tensor:
    """Column norms of the output weights, floored: what neurons are pivoted by."""
    w = W.norm(dim=0)
    return w.clamp_min(float(w.max()) * 1e-12 if w.max() > 0 else 1.0)


def _channels(attn, level: AttentionLevel, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, removed) O-input channels of a level, on `device`."""
    return channels(level, attn.num_heads, attn.head_dim, device)
