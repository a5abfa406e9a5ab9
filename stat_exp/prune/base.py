"""The pruner interface: a pruner scores units from statistics and, optionally, corrects.

Calibration, the FLOPs budget and the surgery belong to the runner; a pruner only turns one
layer's statistics into LayerScores, and applies a plan to that layer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from stat_exp.calibrate import LayerStats
from stat_exp.execution.requirements import Requirements
from stat_exp.factorize.base import Accumulator, Backend
from stat_exp.models.base import ModelAdapter
from stat_exp.models.flops import FlopsModel, LayerShape
from stat_exp.prune.budget import BudgetSpec, LayerPlan
from stat_exp.prune.scores import LayerScores, attention_levels, attention_units
from stat_exp.prune.surgery import prune_attention, prune_ffn
from stat_exp.types import PROPAGATE_MODES, Allocation, GqaMode

# "budget": follow budget.allocation; "global" or "uniform": a pruner that fixes its own.
AllocationChoice = Literal["budget"] | Allocation


class Pruner(ABC):
    """Base class. Subclasses set `name` and `requirements`: what they need of a run (calibration
    data at all, factorizations, channel moments, ...; a class attribute, or set in `__init__` when
    it depends on the options)."""

    name: ClassVar[str] = ""
    requirements: Requirements = Requirements()
    prunes: ClassVar[bool] = True
    # The passes over the calibration data, in order: each stage is streamed, scored, allocated and
    # applied on the model the previous stages left (one stage for most pruners).
    stages: tuple[str, ...] = ("prune",)

    def __init__(self, gqa: GqaMode = "per_group", allocation: AllocationChoice = "budget",
                 propagate: Literal[("calib", *PROPAGATE_MODES)] = "calib"):  # type: ignore[valid-type]
        """`gqa`: per_group keeps the same query heads per KV group; whole_groups removes KV groups whole.
        `allocation`: "budget" follows budget.allocation; "uniform" or "global" fixes it for this
        pruner (the baselines whose scores do not compare across layers were published uniform).
        `propagate`: "calib" follows calib.propagate; "dense" or "pruned" fixes what each block is
        fed while pruning (as a method was published). Values are checked against these hints before
        a job starts (stat_exp.config)."""
        self.gqa, self.allocation, self.propagate = gqa, allocation, propagate

    def allocation_under(self, budget_allocation: Allocation) -> Allocation:
        """The allocation this pruner runs with when the budget asks for `budget_allocation`."""
        return budget_allocation if self.allocation == "budget" else self.allocation

    def propagate_under(self, calib_propagate: str) -> str:
        """What each block is fed while pruning when the calibration asks for `calib_propagate`."""
        return calib_propagate if self.propagate == "calib" else self.propagate

    @property
    def corrects(self) -> bool:
        """Fits a least-squares correction per layer on the calibration tokens, so every layer needs at
        least as many tokens as units it keeps (checked before the weights load)."""
        return False

    @property
    def variant(self) -> str:
        """A short label for non-default settings that change the method (empty by default)."""
        return ""

    def splits_statistics(self, backend: Backend) -> bool:
        """Whether its accumulators for `backend` hold two parts (fit and held-out; the planner counts both)."""
        return False

    def calibration_report(self) -> dict:
        """What the pruner measured about its calibration's adequacy (results.json `calibration`)."""
        return {}

    def accumulator(self, backend: Backend) -> Callable[[int], Accumulator]:
        """How this pruner's layer statistics accumulate: the backend's own by default."""
        return backend.accumulator

    def begin_stage(self, stage: str) -> None:
        """Called by the runner before each of `stages`; pruners with one stage need nothing here."""

    def prepare(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                examples: list[dict[str, torch.Tensor]] | None = None) -> None:
        """Whole-model work before the layer stream (e.g. gradients); most pruners need none.
        `examples`: the `requirements.examples` calibration examples, when the pruner asks for them."""

    @abstractmethod
    def score(self, adapter: ModelAdapter, index: int, layer: nn.Module, stats: LayerStats | None) -> LayerScores:
        """Rank this layer's heads and neurons and price each keep-count."""

    def score_for_plan(self, adapter: ModelAdapter, index: int, layer: nn.Module,
                       stats: LayerStats | None) -> LayerScores:
        """Scores of a block whose counts are already decided (the pruned pass of a global
        allocation): what `apply` reads; a pruner may skip pricing keep-counts here."""
        return self.score(adapter, index, layer, stats)

    def fixed_plans(self, layers: list[int], scores: list[LayerScores], shapes: list[LayerShape],
                    flops: FlopsModel, budget: BudgetSpec) -> list[LayerPlan] | None:
        """Plans the pruner decides itself for these layers (copied counts, its own search), or
        None to use the shared allocation. Called wherever the runner would allocate."""
        return None

    def apply(self, adapter: ModelAdapter, index: int, layer: nn.Module, scores: LayerScores, plan: LayerPlan,
              stats: LayerStats | None) -> None:
        """Slice layer `index` (as in `score`) to the plan, keeping the best-ranked units. Correcting pruners
        override."""
        prune_attention(adapter, layer, scores.attn_levels[plan.attn_level])
        prune_ffn(adapter, layer, scores.ffn_order[: plan.neurons])

    def ranked(self, adapter: ModelAdapter, layer: nn.Module, channel_scores: torch.Tensor,
               neuron_scores: torch.Tensor) -> LayerScores:
        """LayerScores from additive importance scores (higher = keep).

        Heads (or KV groups) score the sum of their channels; the cost of a keep-count is the
        summed score of what it removes.
        """
        attn = adapter.attention(layer)
        units = attention_units(attn.num_heads, attn.num_kv_heads, self.gqa)
        head = channel_scores.double().view(attn.num_heads, attn.head_dim).sum(1)
        unit_scores = torch.stack([head[u].sum() for u in units])
        unit_order = torch.argsort(unit_scores, descending=True, stable=True).tolist()
        levels = attention_levels(unit_order, attn.num_heads, attn.num_kv_heads, self.gqa)
        total = float(head.sum())
        attn_cost = np.array([total - float(head[list(lv.heads)].sum()) for lv in levels])
        order = torch.argsort(neuron_scores.double(), descending=True, stable=True)
        kept = torch.cat([neuron_scores.double().new_zeros(1), torch.cumsum(neuron_scores.double()[order], 0)])
        return LayerScores(ffn_order=order, ffn_cost=(kept[-1] - kept).cpu().numpy(),
                           attn_levels=levels, attn_cost=attn_cost)
