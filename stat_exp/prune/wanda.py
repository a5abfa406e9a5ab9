"""`wanda_sp`: Wanda's weight-times-activation score, made structured (An et al., FLAP paper).

An input channel j of o_proj / down_proj scores s_j = mean_i |W_ij| * ||X_j||_2 (X_j: that
channel's calibration activations); a neuron is its channel, a head sums its channels.
"""
from __future__ import annotations

import torch
from torch import nn

from stat_exp.calibrate import LayerStats
from stat_exp.execution.requirements import Requirements
from stat_exp.models.base import ModelAdapter
from stat_exp.prune.base import Pruner
from stat_exp.prune.scores import LayerScores


class WandaPruner(Pruner):
    name = "wanda_sp"
    requirements = Requirements(moments=True)

    def score(self, adapter: ModelAdapter, index: int, layer: nn.Module, stats: LayerStats | None) -> LayerScores:
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        return self.ranked(adapter, layer, channel_scores(attn.o, stats.attn.norm), channel_scores(ffn.down, stats.ffn.norm))


def channel_scores(linear: nn.Linear, norms: torch.Tensor) -> torch.Tensor:
    """mean_i |W_ij| * ||X_j|| for every input channel j (float64, CPU)."""
    return linear.weight.detach().double().abs().mean(0).cpu() * norms.cpu()
