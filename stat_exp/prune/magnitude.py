"""`magnitude_sp`: data-free structured magnitude pruning.

A neuron scores the norm of its output weights ||W_down[:, j]||; a head the summed norms of its
W_O columns.
"""
from __future__ import annotations

from torch import nn

from stat_exp.calibrate import LayerStats
from stat_exp.execution.requirements import Requirements
from stat_exp.models.base import ModelAdapter
from stat_exp.prune.base import Pruner
from stat_exp.prune.scores import LayerScores


class MagnitudePruner(Pruner):
    name = "magnitude_sp"
    requirements = Requirements(calibration=False)

    def score(self, adapter: ModelAdapter, index: int, layer: nn.Module, stats: LayerStats | None) -> LayerScores:
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        return self.ranked(adapter, layer, attn.o.weight.detach().norm(dim=0), ffn.down.weight.detach().norm(dim=0))
