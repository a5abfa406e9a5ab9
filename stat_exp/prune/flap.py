"""`flap`: FLAP (An et al., AAAI 2024), fluctuation-based pruning with bias compensation.

Score: an input channel j of o_proj / down_proj has fluctuation F_j (variance of its calibration
activations) and s_j = F_j * ||W[:, j]||^2 ("WIFV"). As in the released code, the attention
channel scores are squared, then standardised over the layer's O-input channels, and a head
scores the mean of its channels; neuron scores are standardised over the layer's neurons.

Structure ("AL-AM", the paper's default): with `budget.allocation=global`, one threshold over the
standardised scores of all heads and neurons of all layers. FLAP prices a head as 512/3 neurons
(parameters); here a unit costs its FLOPs from the shared FlopsModel. The threshold is the first
unit, in descending score, that no longer fits the budget; the FLOPs it leaves are then filled
with the next units that still fit (e.g. neurons when a head did not), so the budget is met.
This is a threshold, not a Lagrangian allocation (which would weigh score per FLOP), so it runs
as `fixed_plans` over `global_rank.Increments` rather than through `allocate`. Deviations: every
layer keeps at least its smallest attention level and `round_to` neurons (FLAP may empty a
layer), and under grouped-query attention heads are taken in the levels of `pruner.gqa` (a level's
score is the mean of the heads it adds). With `budget.allocation=uniform` ("UL-UM") the shared
uniform allocation keeps the best-scored units of each layer.

Bias compensation: the removed channels' mean contribution becomes a bias,
b <- b + W[:, removed] @ mean(x_removed), on o_proj and down_proj (created when the model has
none; `stat_exp.export` records such biases so the saved model reloads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stat_exp.calibrate import ChannelMoments, LayerStats
from stat_exp.execution.requirements import Requirements
from stat_exp.models.base import ModelAdapter
from stat_exp.models.flops import FlopsModel, LayerShape
from stat_exp.prune.base import Pruner
from stat_exp.prune.budget import BudgetSpec, LayerPlan
from stat_exp.prune.global_rank import Increments
from stat_exp.prune.scores import LayerScores
from stat_exp.prune.surgery import head_channels, prune_attention, prune_ffn


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over one layer's module, so scores compare across layers and modules."""
    return (x - x.mean()) / x.std().clamp_min(1e-300)


def fluctuation_scores(linear: nn.Linear, moments: ChannelMoments) -> torch.Tensor:
    """F_j * ||W[:, j]||^2 for every input channel j (float64, CPU)."""
    return moments.variance.cpu() * linear.weight.detach().double().square().sum(0).cpu()


@dataclass
class FlapState:
    """One layer's standardised scores (heads, neurons): what the global threshold compares."""

    standardised: tuple[torch.Tensor, torch.Tensor]


class FlapPruner(Pruner):
    name = "flap"
    requirements = Requirements(moments=True)

    def score(self, adapter: ModelAdapter, index: int, layer: nn.Module,
              stats: LayerStats | None) -> LayerScores[FlapState, None]:
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        channels = fluctuation_scores(attn.o, stats.attn).square()
        neurons = fluctuation_scores(ffn.down, stats.ffn)
        scores = self.ranked(adapter, layer, channels, neurons)
        heads = standardise(channels).view(attn.num_heads, attn.head_dim).mean(1)
        scores.state = FlapState(standardised=(heads, standardise(neurons)))
        return scores

    def fixed_plans(self, layers: list[int], scores: list[LayerScores], shapes: list[LayerShape],
                    flops: FlopsModel, budget: BudgetSpec) -> list[LayerPlan] | None:
        if budget.allocation != "global":
            return None
        inc = Increments.build(scores, shapes, flops, budget.round_to,
                               [sc.state.standardised for sc in scores], reduce="mean")
        return inc.plans(inc.fill(inc.ranking(), inc.headroom(budget.flops)))

    def apply(self, adapter: ModelAdapter, index: int, layer: nn.Module, scores: LayerScores, plan: LayerPlan,
              stats: LayerStats | None) -> None:
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        level = scores.attn_levels[plan.attn_level]
        kept_channels = head_channels(level.heads, attn.head_dim)
        neurons = scores.ffn_order[: plan.neurons]
        prune_attention(adapter, layer, level, o_bias=compensated_bias(attn.o, kept_channels, stats.attn.mean))
        prune_ffn(adapter, layer, neurons, down_bias=compensated_bias(ffn.down, neurons, stats.ffn.mean))


def compensated_bias(linear: nn.Linear, kept: torch.Tensor, mean: torch.Tensor) -> torch.Tensor | None:
    """b + W[:, removed] @ mean[removed], or None when nothing is removed."""
    removed = torch.ones(linear.in_features, dtype=torch.bool)
    removed[kept.cpu()] = False
    if not removed.any():
        return None
    W = linear.weight.detach().double().cpu()
    bias = W[:, removed] @ mean.double().cpu()[removed]
    return bias if linear.bias is None else bias + linear.bias.detach().double().cpu()
