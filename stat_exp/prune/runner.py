"""Drives a pruner over a model: stream statistics, score, allocate the budget, apply.

The order of these steps depends on where the budget is decided: `uniform` decides each layer on
its own, `global` needs every layer's scores first. With `calib.propagate=pruned` and a global
budget, a first dense pass decides the counts and a second pass prunes in order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from stat_exp.calibrate import LayerStats, LayerStream
from stat_exp.factorize.base import Backend
from stat_exp.models.base import ModelAdapter
from stat_exp.prune.base import Pruner
from stat_exp.prune.budget import BudgetSpec, FlopsModel, LayerPlan, LayerShape, allocate
from stat_exp.prune.scores import LayerScores


@dataclass
class PruneOutcome:
    """What pruning did: achieved fractions, per-layer structure, and where the time went."""

    achieved: dict[str, float]
    structure: dict[str, list[int]]
    timing_s: dict[str, float] = field(default_factory=dict)


def prunable_params(adapter: ModelAdapter) -> int:
    """Parameters of the projections pruning can cut (attention and FFN of every block)."""
    total = 0
    for layer in adapter.layers():
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        for lin in (attn.q, attn.k, attn.v, attn.o, ffn.down, *ffn.inputs):
            total += sum(p.numel() for p in lin.parameters())
    return total


def shapes_of(adapter: ModelAdapter) -> list[LayerShape]:
    return [LayerShape.of(adapter.attention(l), adapter.ffn(l)) for l in adapter.layers()]


def model_flops(adapter: ModelAdapter, flops: FlopsModel) -> float:
    """Prunable FLOPs of the model as it is now."""
    return sum(flops.layer(s, s.num_heads, s.num_kv_heads, s.ffn_width) for s in shapes_of(adapter))


class PruneRunner:
    """One pruning job: a pruner, a budget, a factorization backend and calibration batches."""

    def __init__(self, pruner: Pruner, budget: BudgetSpec, backend: Backend | None,
                 propagate: str = "dense", progress: bool = True):
        budget = replace(budget, allocation=pruner.allocation_under(budget.allocation))
        self.pruner, self.budget, self.backend = pruner, budget, backend
        self.propagate, self.progress = pruner.propagate_under(propagate), progress
        self.flops = FlopsModel(budget.seq_len)
        self._streamed = 0.0  # seconds spent streaming calibration batches through blocks

    def run(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
            device: torch.device, examples: list[dict[str, torch.Tensor]] | None = None) -> PruneOutcome:
        """`examples`: the calibration examples the pruner asked for (`prepare_examples`), if any."""
        dense_flops, dense_params = model_flops(adapter, self.flops), prunable_params(adapter)
        timing: dict[str, float] = {}
        if self.pruner.prunes:
            start = time.perf_counter()
            if examples is None:
                self.pruner.prepare(model, adapter, batches)
            else:
                self.pruner.prepare(model, adapter, batches, examples)
            self._streamed = 0.0
            self._prune(model, adapter, batches, device)
            timing["calibrate"] = self._streamed
            timing["prune"] = time.perf_counter() - start - self._streamed
        return PruneOutcome(
            achieved={"flops_fraction": model_flops(adapter, self.flops) / dense_flops,
                      "params_fraction": prunable_params(adapter) / dense_params,
                      "params": sum(p.numel() for p in model.parameters())},
            structure=adapter.structure(), timing_s=timing)

    def _allocate(self, scores: list[LayerScores], shapes: list[LayerShape],
                  layers: list[int] | None = None) -> list[LayerPlan]:
        """The pruner's own plans when it has them, else the shared allocation.

        `layers`: the model's layer indices these scores belong to (all layers when None)."""
        layers = list(range(len(scores))) if layers is None else layers
        plans = self.pruner.fixed_plans(layers, scores, shapes, self.flops, self.budget)
        if plans is not None:
            return plans
        b = self.budget
        return allocate(scores, shapes, self.flops, b.flops, b.allocation, b.round_to)

    def _prune(self, model, adapter, batches, device) -> None:
        shapes = shapes_of(adapter)
        if not (self.pruner.needs_calibration and self.pruner.needs_layer_stream):
            scores = [self.pruner.score(adapter, i, l, None) for i, l in enumerate(adapter.layers())]
            self.apply_plans(adapter, [(sc, None) for sc in scores], self._allocate(scores, shapes))
            return
        per_layer = self.budget.allocation == "uniform"
        plans = None
        if not per_layer and self.propagate == "pruned":
            plans = self._allocate([sc for sc, _ in self.score_layers(model, adapter, batches, device)], shapes)
        deferred: list[tuple[LayerScores, LayerStats]] = []
        for i, layer, stats in self._stream(model, adapter, batches, device, self.propagate):
            sc = self.pruner.score(adapter, i, layer, stats)
            stats.attn_factor = stats.ffn_factor = None  # the scores hold what is still needed
            if per_layer:
                plan = self._allocate([sc], [shapes[i]], [i])[0]
            elif plans is not None:
                plan = plans[i]
            else:
                deferred.append((sc, stats))
                continue
            self.pruner.apply(adapter, layer, sc, plan, stats)
        if deferred:
            self.apply_plans(adapter, deferred, self._allocate([sc for sc, _ in deferred], shapes))

    def score_layers(self, model, adapter, batches, device) -> list[tuple[LayerScores, LayerStats]]:
        """Every layer's scores and statistics from one dense pass, pruning nothing: for decisions
        that need all layers first, and for studies of several budgets on one calibration."""
        scored = []
        for i, layer, stats in self._stream(model, adapter, batches, device, "dense"):
            scored.append((self.pruner.score(adapter, i, layer, stats), stats))
            stats.attn_factor = stats.ffn_factor = None  # the scores hold what is still needed
        return scored

    def _stream(self, model, adapter, batches, device, propagate: str):
        """Iterate the layer stream, adding its forward time to the calibration time."""
        make = self.pruner.accumulator(self.backend) if self.pruner.needs_factorization and self.backend else None
        model_major = not (self.backend and self.backend.holds_activations and make)
        stream = LayerStream(model, adapter, batches, device, propagate, make, self.progress, model_major,
                             moments=self.pruner.needs_moments)
        yield from stream
        self._streamed += stream.seconds

    def apply_plans(self, adapter: ModelAdapter, scored: list[tuple[LayerScores, LayerStats | None]],
                    plans: list[LayerPlan]) -> None:
        """Prune every layer to its plan (the model behind `adapter` may be a copy of the scored one)."""
        for layer, (sc, stats), plan in zip(tqdm(adapter.layers(), desc="prune", disable=not self.progress),
                                            scored, plans):
            self.pruner.apply(adapter, layer, sc, plan, stats)
