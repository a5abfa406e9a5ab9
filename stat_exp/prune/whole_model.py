"""Pruners that change a model's architecture as a whole instead of cutting units block by block
(SliceGPT's rotated, narrower residual stream; removing whole blocks).

The runner hands the budget only to the allocation step, so that is where the work happens:
`prepare` keeps the model and the calibration batches, `fixed_plans` transforms the model to the
budget and returns plans that keep every unit of what is left, and `apply` has nothing to do.
Calibration, the FLOPs accounting of the result, evaluation, saving and logging stay the runner's
and the pipeline's, as for every pruner.
"""
from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from stat_exp.calibrate import BlockBoundary, LayerStats, _first_output, capture_block_inputs
from stat_exp.models.base import ModelAdapter
from stat_exp.prune.base import Pruner
from stat_exp.execution.requirements import Requirements
from stat_exp.models.flops import FlopsModel, LayerShape
from stat_exp.prune.budget import BudgetSpec, LayerPlan
from stat_exp.prune.none import keep_everything
from stat_exp.prune.scores import LayerScores


class WholeModelPruner(Pruner):
    """Subclasses implement `transform`: the model, pruned to `budget`, in place."""

    requirements = Requirements(layer_stream=False, whole_model=True)

    def __init__(self):
        super().__init__()
        self._work: tuple[nn.Module, ModelAdapter, list[dict[str, torch.Tensor]]] | None = None

    def prepare(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                examples: list[dict[str, torch.Tensor]] | None = None) -> None:
        self._work = (model, adapter, batches)

    def score(self, adapter: ModelAdapter, index: int, layer: nn.Module, stats: LayerStats | None) -> LayerScores:
        return keep_everything(adapter, layer)

    def fixed_plans(self, layers: list[int], scores: list[LayerScores], shapes: list[LayerShape],
                    flops: FlopsModel, budget: BudgetSpec) -> list[LayerPlan]:
        model, adapter, batches = self._work
        self._work = None
        self.transform(model, adapter, batches, flops, budget)
        return [LayerPlan(0, adapter.ffn(layer).width) for layer in adapter.layers()]

    def apply(self, adapter: ModelAdapter, index: int, layer: nn.Module, scores: LayerScores, plan: LayerPlan,
              stats: LayerStats | None) -> None:
        """Nothing: `transform` already left the model as it should be."""

    @abstractmethod
    def transform(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                  flops: FlopsModel, budget: BudgetSpec) -> None:
        """Prune `model` in place so that it keeps `budget.flops` of its prunable FLOPs (at most)."""


def block_inputs(model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]]) -> BlockBoundary:
    """The calibration set at block 0's input, on the model's device."""
    return capture_block_inputs(model, adapter, batches, next(model.parameters()).device)


@torch.inference_mode()
def run_block(layer: nn.Module, boundary: BlockBoundary, index: int, hidden: list[torch.Tensor],
              first_batch: int = 0) -> list[torch.Tensor]:
    """Block `index` (possibly a changed one) over the batches `hidden` (calibration batches
    `first_batch`, `first_batch` + 1, ...), with their recorded call arguments."""
    calls = boundary.calls[first_batch: first_batch + len(hidden)]
    return [_first_output(layer(h, *c[index].args, **c[index].kwargs)) for h, c in zip(hidden, calls)]
