"""The budget and its allocation to layers: the kept fraction of the prunable FLOPs
(`stat_exp.models.flops`), spent globally or uniformly."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from stat_exp.errors import UserError
from stat_exp.models.flops import FlopsModel, LayerShape
from stat_exp.prune.scores import LayerScores
from stat_exp.types import ALLOCATIONS, Allocation, Fraction, PositiveInt, SeqLen

Selection = Literal["held_out", "output_priced", "off"]  # budget.select: how the global allocation's plan is chosen
SLACK_TOLERANCE = 0.005  # unspent budget (fraction of dense FLOPs) the global allocation may leave


class BudgetError(UserError, ValueError):
    """The requested budget cannot be met under the structural constraints."""


@dataclass
class BudgetSpec:
    """The budget as configured: kept FLOPs fraction, FLOPs sequence length, allocation, rounding.

    `select`: under the global allocation, `held_out` chooses the plan among candidates (uniform,
    global, global with per-layer floors) by the pruned model's divergence from the dense model on
    `held_out_examples` calibration examples the statistics are not fitted on
    (`stat_exp.prune.plan_selection`); `output_priced` adds the global plan priced by each block's
    output sensitivity (`stat_exp.prune.sensitivity`, models with logits) to the candidates; `off`
    applies the global plan as it is."""

    flops: Fraction = 0.7  # conf/budget/flops.yaml's default too
    seq_len: SeqLen = 256
    allocation: Allocation = "global"
    round_to: PositiveInt = 1
    select: Selection = "held_out"
    held_out_examples: PositiveInt = 8


@dataclass
class LayerPlan:
    """What one layer keeps: an attention level (index into LayerScores.attn_levels) and k neurons."""

    attn_level: int
    neurons: int


def neuron_options(width: int, round_to: int) -> np.ndarray:
    step = max(1, round_to)
    opts = np.arange(step, width + 1, step)
    return opts if opts.size and opts[-1] == width else np.append(opts, width)


def _round_neurons(k: float, width: int, round_to: int) -> int:
    step = max(1, round_to)
    return int(min(width, max(step, step * math.floor(k / step + 0.5))))


def allocate(scores: list[LayerScores], shapes: list[LayerShape], flops: FlopsModel, target: float,
             mode: str = "global", round_to: int = 1, minimum: list[LayerPlan] | None = None) -> list[LayerPlan]:
    """Per-layer counts that keep `target` of the prunable FLOPs.

    `uniform` keeps the same fraction in every layer (heads rounded, neurons filling the rest).
    `global` minimises the summed cost curves under the FLOPs total: a Lagrangian search over one
    price per FLOP, shared by heads and neurons of all layers (so the split between them falls out
    of the search), then the remaining slack is filled with the neurons that lower the cost most.
    `minimum` (global only): per-layer floors, no layer keeps a lower attention level or fewer
    neurons than its floor (the floors' FLOPs must fit the budget).
    """
    if not 0 < target <= 1:
        raise BudgetError(f"budget.flops={target} must be in (0, 1]")
    if mode not in ALLOCATIONS:
        raise BudgetError(f"budget.allocation={mode!r}; allowed: {', '.join(ALLOCATIONS)}")
    dense = sum(flops.dense(s) for s in shapes)
    floor = sum(_layer_options(sc, sh, flops, round_to)[0][0].min() + _layer_options(sc, sh, flops, round_to)[1][0].min()
                for sc, sh in zip(scores, shapes))
    if floor > target * dense * 1.0000001:
        raise BudgetError(
            f"budget.flops={target} is below the smallest reachable fraction {floor / dense:.3f} "
            f"(at least one attention level and {max(1, round_to)} neurons per layer)")
    if mode == "uniform":
        return [_uniform_layer(sc, sh, flops, target, round_to) for sc, sh in zip(scores, shapes)]
    return _global(scores, shapes, flops, target * dense, round_to, tolerance=SLACK_TOLERANCE * dense,
                   minimum=minimum)


def _layer_options(sc: LayerScores, sh: LayerShape, flops: FlopsModel, round_to: int,
                   floor: LayerPlan | None = None):
    """(flops, cost) arrays for the attention levels and for the neuron counts of one layer; options
    below `floor` cost infinity (never chosen)."""
    attn_f = np.array([flops.attention(sh, lv.num_heads, lv.num_kv_heads) for lv in sc.attn_levels])
    attn_c = np.asarray(sc.attn_cost, dtype=np.float64)
    ks = neuron_options(sh.ffn_width, round_to)
    ffn_f = np.array([flops.ffn(sh, int(k)) for k in ks])
    ffn_c = np.asarray(sc.ffn_cost, dtype=np.float64)[ks]
    if floor is not None:
        attn_c = np.where(np.arange(len(attn_c)) < floor.attn_level, np.inf, attn_c)
        ffn_c = np.where(ks < min(floor.neurons, int(ks[-1])), np.inf, ffn_c)
    return (attn_f, attn_c), (ffn_f, ffn_c, ks)


def _uniform_layer(sc: LayerScores, sh: LayerShape, flops: FlopsModel, target: float, round_to: int) -> LayerPlan:
    n_levels = len(sc.attn_levels)
    level = min(n_levels - 1, max(0, math.floor(target * n_levels + 0.5) - 1))
    lv = sc.attn_levels[level]
    rest = target * flops.dense(sh) - flops.attention(sh, lv.num_heads, lv.num_kv_heads)
    per_neuron = flops.ffn(sh, 1)
    return LayerPlan(level, _round_neurons(rest / per_neuron, sh.ffn_width, round_to))


def _global(scores, shapes, flops: FlopsModel, budget: float, round_to: int, tolerance: float,
            minimum: list[LayerPlan] | None = None) -> list[LayerPlan]:
    floors: list[LayerPlan | None] = list(minimum) if minimum else [None] * len(scores)
    options = [_layer_options(sc, sh, flops, round_to, fl) for sc, sh, fl in zip(scores, shapes, floors)]
    # every (layer, module) is one choice: an index into its (flops, cost) arrays
    menus = [(f, c) for (attn, (ff, fc, _)) in options for (f, c) in (attn, (ff, fc))]

    def choose(price: float) -> list[int]:
        return [int(np.argmin(c + price * f)) for f, c in menus]

    def total(picks: list[int]) -> float:
        return sum(f[i] for (f, _), i in zip(menus, picks))

    lo, hi = 0.0, 1.0
    while total(choose(hi)) > budget and hi < 1e300:
        hi *= 4.0
    for _ in range(200):  # bisection on the price per FLOP
        mid = (lo + hi) / 2
        if total(choose(mid)) > budget:
            lo = mid
        else:
            hi = mid
    picks = choose(hi)
    picks = _fill_slack(menus, picks, budget - total(picks))
    picks = _exchange(menus, picks, budget - total(picks), tolerance)
    return [LayerPlan(picks[2 * i], int(opt[1][2][picks[2 * i + 1]])) for i, opt in enumerate(options)]


def _fill_slack(menus, picks: list[int], slack: float) -> list[int]:
    """Spend what the discrete price search left over on the steps that lower the cost most per FLOP."""
    picks = list(picks)
    while True:
        best, best_gain = None, -np.inf
        for m, (f, c) in enumerate(menus):
            j = picks[m]
            if j + 1 < len(f) and f[j + 1] - f[j] <= slack:
                gain = (c[j] - c[j + 1]) / (f[j + 1] - f[j])
                if gain > best_gain:
                    best, best_gain = m, gain
        if best is None:
            return picks
        f = menus[best][0]
        slack -= f[picks[best] + 1] - f[picks[best]]
        picks[best] += 1


def _exchange(menus, picks: list[int], slack: float, tolerance: float) -> list[int]:
    """Take coarse up-steps (a head level) that do not fit the slack, paid for with the cheapest
    fine down-steps elsewhere, when that lowers the total cost, or when more than `tolerance`
    FLOPs would otherwise stay unspent; then refill what is left."""
    picks = list(picks)
    for _ in range(sum(len(f) for f, _ in menus)):  # each accepted exchange raises one step
        best = None
        for m, (f, c) in enumerate(menus):
            j = picks[m]
            if j + 1 >= len(f) or f[j + 1] - f[j] <= slack:
                continue
            trial, freed, loss = _free(menus, picks, f[j + 1] - f[j] - slack, finer_than=f[j + 1] - f[j])
            if trial is not None and (best is None or c[j] - c[j + 1] - loss > best[0]):
                best = (c[j] - c[j + 1] - loss, m, trial, freed - (f[j + 1] - f[j]))
        if best is None or (best[0] <= 0 and slack <= tolerance):
            break
        _, m, picks, extra = best
        picks[m] += 1
        slack += extra
    return _fill_slack(menus, picks, slack)


def _free(menus, picks: list[int], need: float, finer_than: float):
    """Step down the choices whose cost rises least per FLOP until `need` FLOPs are freed, using
    only steps finer than the one being paid for (so an exchange never just moves a head level)."""
    trial, freed, loss = list(picks), 0.0, 0.0
    while freed < need:
        best, best_rate = None, np.inf
        for m, (f, c) in enumerate(menus):
            j = trial[m]
            if j > 0 and f[j] - f[j - 1] < finer_than:
                rate = (c[j - 1] - c[j]) / (f[j] - f[j - 1])
                if rate < best_rate:
                    best, best_rate = m, rate
        if best is None:
            return None, 0.0, np.inf
        f, c = menus[best]
        j = trial[best]
        freed += f[j] - f[j - 1]
        loss += c[j - 1] - c[j]
        trial[best] -= 1
    return trial, freed, loss
