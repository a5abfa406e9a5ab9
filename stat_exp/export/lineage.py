"""Fractions against the dense model when the input was itself a pruned export.

Pruning a pruned model again (iterative pruning) aims `budget.flops` at the model it is given,
so the fractions compose: 0.7 of a 0.7 model keeps 0.49 of the dense one. results.json reports
`flops_fraction` and `params_fraction` against the dense origin that config.json carried in, and
the fractions of the input model as `flops_fraction_of_input` / `params_fraction_of_input`.
"""
from __future__ import annotations

from torch import nn

from stat_exp.export.record import recorded_origin
from stat_exp.models.base import ModelAdapter
from stat_exp.models.flops import FlopsModel, model_flops, prunable_params
from stat_exp.prune.budget import BudgetSpec


def against_dense(model: nn.Module, adapter: ModelAdapter, achieved: dict[str, float],
                  budget: BudgetSpec) -> dict[str, float]:
    """`achieved` (fractions of the input model) restated against the dense origin, if any."""
    origin = recorded_origin(model)
    if origin is None:
        return achieved
    flops = FlopsModel(budget.seq_len)
    dense_flops = sum(flops.dense(shape) for shape in origin.layers)
    return {**achieved,
            "flops_fraction": model_flops(adapter, flops) / dense_flops,
            "params_fraction": prunable_params(adapter) / origin.prunable_params,
            "flops_fraction_of_input": achieved["flops_fraction"],
            "params_fraction_of_input": achieved["params_fraction"]}
