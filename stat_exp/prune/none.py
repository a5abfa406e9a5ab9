"""`none`: the dense baseline. The runner leaves the model as loaded, whatever the budget says."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stat_exp.calibrate import LayerStats
from stat_exp.execution.requirements import Requirements
from stat_exp.models.base import ModelAdapter
from stat_exp.prune.base import Pruner
from stat_exp.prune.scores import AttentionLevel, LayerScores


def keep_everything(adapter: ModelAdapter, layer: nn.Module) -> LayerScores:
    """Scores with only the layer's dense layout, at no cost (nothing to choose)."""
    attn, width = adapter.attention(layer), adapter.ffn(layer).width
    dense = AttentionLevel(tuple(range(attn.num_heads)), tuple(range(attn.num_kv_heads)))
    return LayerScores(ffn_order=torch.arange(width), ffn_cost=np.zeros(width + 1),
                       attn_levels=[dense], attn_cost=np.zeros(1))


class NoPruner(Pruner):
    name = "none"
    requirements = Requirements(calibration=False)
    prunes = False

    def score(self, adapter: ModelAdapter, index: int, layer: nn.Module, stats: LayerStats | None) -> LayerScores:
        """Only the dense layout, at no cost."""
        return keep_everything(adapter, layer)
