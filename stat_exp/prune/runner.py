"""Drives a pruner over a model: stream statistics, score, allocate the budget, apply.

The order of these steps depends on where the budget is decided: `uniform` decides each layer on
its own, `global` needs every layer's scores first.

`calib.propagate=pruned` feeds each block the pruned previous block's outputs. Each block's pruned
output is computed once, by the pruned block, and is the next block's input; the run that gathers
the block's statistics (the dense block on those inputs) stops at the last statistic, before the
down projection, since its own outputs would be thrown away (`LayerStream`). With `uniform` that
is one stream. A global allocation needs every block's cost curves before any count is known, and
block i's statistics under pruned propagation depend on the counts of blocks < i, so exactness
forces two streams: a dense one that prices every block (its factorizations kept only while the
plan is chosen among candidates on held-out batches), then the pruned one, which knows the counts
and so skips what only the allocation reads
(`Pruner.score_for_plan`: STAT's cost curves, as costly as its factorizations). Reusing the dense
pass's factorizations is exact for block 0 alone (the only block whose inputs do not change), so
they are not applied. A pruner with several `stages` (FFN neurons first, then heads) gets one such
pass per stage, each on the model the previous stages left. What waits for a global allocation is bounded: small cost curves are
kept, the heavy per-block state is held, spilled to disk or recomputed (`factors`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from stat_exp.calibrate import LayerStats, LayerStream
from stat_exp.errors import ConfigError
from stat_exp.execution.choices import STREAMS
from stat_exp.execution.factors import Pending, factors_class
from stat_exp.execution.offload import BlockStore
from stat_exp.factorize.base import Backend
from stat_exp.models.base import ModelAdapter
from stat_exp.models.flops import FlopsModel, LayerShape, model_flops, prunable_params, shapes_of
from stat_exp.prune.base import Pruner
from stat_exp.prune.budget import BudgetSpec, LayerPlan, allocate
from stat_exp.prune.plan_selection import CHOOSING, Selection, candidate_plans, choose_plan
from stat_exp.prune.sensitivity import output_sensitivity
from stat_exp.prune.scores import LayerScores


@dataclass
class PruneOutcome:
    """What pruning did: achieved fractions, per-layer structure, and where the time went."""

    achieved: dict[str, float]
    structure: dict[str, list[int]]
    timing_s: dict[str, float] = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)  # the pruner's calibration report
    allocation: dict = field(default_factory=dict)  # which plan the global allocation applied, and why


class PruneRunner:
    """One pruning job: a pruner, a budget, a factorization backend and calibration batches.

    `stream`: "model" visits every block in one forward pass per batch (fast, every block's
    statistics held at once); "block" visits one block at a time over all batches (what is held
    does not grow with depth; required when blocks are offloaded). `factors`: under a global
    allocation, where each block's heavy state (factorizations) waits for the allocation: "hold"
    in memory, "spill" to files in `spill_dir`, or "recompute" (dropped, and the block scored
    again in a second pass over the calibration set).
    """

    def __init__(self, pruner: Pruner, budget: BudgetSpec, backend: Backend | None,
                 propagate: str = "dense", progress: bool = True, stream: str = "model", factors: str = "hold",
                 spill_dir: Path | None = None):
        if stream not in STREAMS:
            raise ConfigError(f"execution.stream={stream!r}; allowed: {', '.join(STREAMS)}")
        budget = replace(budget, allocation=pruner.allocation_under(budget.allocation))
        self.pruner, self.budget, self.backend = pruner, budget, backend
        self.propagate, self.progress = pruner.propagate_under(propagate), progress
        self.stream, self.factors = stream, factors_class(factors)(spill_dir)
        self.flops = FlopsModel(budget.seq_len)
        self._streamed = 0.0  # seconds spent streaming calibration batches through blocks
        self.held_out: list[dict[str, torch.Tensor]] = []  # examples for choosing the plan (plan_selection)
        self.selection: Selection | None = None

    def run(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
            device: torch.device, store: BlockStore | None = None,
            examples: list[dict[str, torch.Tensor]] | None = None,
            held_out: list[dict[str, torch.Tensor]] | None = None) -> PruneOutcome:
        """`examples`: the calibration examples the pruner asked for (`requirements.examples`), if any.
        `held_out`: calibration batches the statistics are not fitted on, for choosing the global
        allocation's plan (`budget.select=held_out`); without them the global plan is applied."""
        store = store or BlockStore(model, adapter, device)
        self.held_out = list(held_out or [])
        if not store.resident and self.pruner.requirements.whole_model:
            raise ConfigError(f"pruner={self.pruner.name} runs the whole model at once (gradients); "
                              f"it needs execution.offload=none, not {store.mode}")
        dense_flops, dense_params = model_flops(adapter, self.flops), prunable_params(adapter)
        timing: dict[str, float] = {}
        if self.pruner.prunes:
            start = time.perf_counter()
            if examples is None:
                self.pruner.prepare(model, adapter, batches)
            else:
                self.pruner.prepare(model, adapter, batches, examples)
            self._streamed = 0.0
            self._prune(model, adapter, batches, device, store)
            timing["calibrate"] = self._streamed
            timing["prune"] = time.perf_counter() - start - self._streamed
        return PruneOutcome(
            achieved={"flops_fraction": model_flops(adapter, self.flops) / dense_flops,
                      "params_fraction": prunable_params(adapter) / dense_params,
                      "params": sum(p.numel() for p in model.parameters())},
            structure=adapter.structure(), timing_s=timing,
            diagnostics=self.pruner.calibration_report() if self.pruner.prunes else {},
            allocation=self.selection.record() if self.selection else {"chosen": self.budget.allocation})

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

    def _prune(self, model, adapter, batches, device, store: BlockStore) -> None:
        for stage in self.pruner.stages:
            self.pruner.begin_stage(stage)
            self._prune_stage(model, adapter, batches, device, store)

    def _prune_stage(self, model, adapter, batches, device, store: BlockStore) -> None:
        """One pass: stream, score, allocate and apply, on the model as earlier stages left it; the
        order of these steps depends on what the pruner needs and where the budget is decided."""
        if not self.pruner.requirements.layer_statistics:
            path = self._without_statistics
        elif self.budget.allocation == "uniform":
            path = self._uniform_as_it_streams
        elif self.propagate == "pruned":
            path = self._global_then_pruned_pass
        else:
            path = self._global_with_pending_factors
        path(model, adapter, batches, device, store, shapes_of(adapter))

    def _without_statistics(self, model, adapter, batches, device, store: BlockStore,
                            shapes: list[LayerShape]) -> None:
        """No layer statistics (scores from the weights, or from the pruner's own whole-model pass):
        score every block, allocate, apply; nothing streams."""
        scores = []
        for i in range(len(shapes)):
            with store.block(i) as layer:
                scores.append(self.pruner.score(adapter, i, layer, None))
        self._apply_stored(adapter, store, lambda i: (scores[i], None), self._allocate(scores, shapes))

    def _uniform_as_it_streams(self, model, adapter, batches, device, store: BlockStore,
                               shapes: list[LayerShape]) -> None:
        """Uniform allocation: each block decided on its own and pruned as it streams, before the
        next block is fed (its pruned outputs under propagate=pruned); one pass."""
        for i, layer, stats in self._stream(model, adapter, batches, device, self.propagate, store):
            sc = self._score(adapter, i, layer, stats)
            self.pruner.apply(adapter, i, layer, sc, self._allocate([sc], [shapes[i]], [i])[0], stats)

    def _global_then_pruned_pass(self, model, adapter, batches, device, store: BlockStore,
                                 shapes: list[LayerShape]) -> None:
        """Global allocation with propagate=pruned: the counts from a dense pass (chosen among
        candidates on held-out batches when asked: the pass's heavy state then waits as below), then
        a pruned pass that scores each block for its known counts and prunes it in order. The
        candidates are compared with corrections fitted on the dense stream; the applied model's are
        fitted on the pruned one."""
        choosing = self.budget.select in CHOOSING and bool(self.held_out)
        with self.factors.pending() as pending:
            plans = self._dense_plans(model, adapter, batches, device, store, shapes, pending,
                                      keep_heavy=choosing and not self.factors.second_pass)
        for i, layer, stats in self._stream(model, adapter, batches, device, "pruned", store):
            self.pruner.apply(adapter, i, layer, self._score(adapter, i, layer, stats, planned=True), plans[i], stats)

    def _global_with_pending_factors(self, model, adapter, batches, device, store: BlockStore,
                                     shapes: list[LayerShape]) -> None:
        """Global allocation on dense inputs: the plan from a dense pass whose heavy state waits
        (held, spilled or dropped: `factors`), then applied from that state, or, with the heavy state
        dropped, from a second dense pass that scores every block again."""
        keep_heavy = not self.factors.second_pass
        with self.factors.pending() as pending:
            plans = self._dense_plans(model, adapter, batches, device, store, shapes, pending, keep_heavy)
            if keep_heavy:
                self._apply_stored(adapter, store, pending.take, plans)
                return
        for i, layer, stats in self._stream(model, adapter, batches, device, "dense", store):
            self.pruner.apply(adapter, i, layer, self._score(adapter, i, layer, stats), plans[i], stats)

    def _dense_plans(self, model, adapter, batches, device, store: BlockStore, shapes: list[LayerShape],
                     pending: Pending, keep_heavy: bool) -> list[LayerPlan]:
        """Every block scored in one dense pass into `pending` (its heavy state kept when `keep_heavy`)
        and the global plan, chosen among candidates on held-out batches when asked: from the pending
        state, or, without it, from a dense pass that scores every block again."""
        for i, layer, stats in self._stream(model, adapter, batches, device, "dense", store):
            pending.put(i, self._score(adapter, i, layer, stats), stats, keep_heavy)
        if not self._selects(pending.scores(), shapes):
            return self._allocate(pending.scores(), shapes)
        blocks = self._peeked(pending, store) if keep_heavy else self._rescored(model, adapter, batches, device, store)
        return self._choose(model, adapter, pending.scores(), shapes, blocks, device, store)

    def _selects(self, scores: list[LayerScores], shapes: list[LayerShape]) -> bool:
        """Whether the global plan is chosen among candidates: asked for, held-out batches given, and
        the plans come from the shared allocation (not the pruner's own)."""
        return (self.budget.select in CHOOSING and bool(self.held_out) and
                self.pruner.fixed_plans(list(range(len(scores))), scores, shapes, self.flops, self.budget) is None)

    def _choose(self, model, adapter, scores, shapes, blocks, device, store: BlockStore) -> list[LayerPlan]:
        """The candidate plan closest to the dense model on the held-out batches (see plan_selection)."""
        home = device if store.resident else torch.device("cpu")
        clock = time.perf_counter(), time.process_time()
        weights = (output_sensitivity(model, adapter, self.held_out, store.block, device, home)
                   if self.budget.select == "output_priced" else None)
        self.selection = choose_plan(candidate_plans(scores, shapes, self.flops, self.budget, weights), blocks, model,
                                     adapter, self.held_out, device, home, self.pruner.apply, self.progress,
                                     weights, clock)
        return self.selection.plans[self.selection.chosen]

    def _peeked(self, pending: Pending, store: BlockStore):
        """Every block on the device in turn, with its held scores and statistics."""
        for i in range(len(pending.scores())):
            with store.block(i) as layer:
                yield (i, layer, *pending.peek(i))

    def _rescored(self, model, adapter, batches, device, store: BlockStore):
        """Every block scored again from a dense pass (`factors=recompute`)."""
        for i, layer, stats in self._stream(model, adapter, batches, device, "dense", store):
            yield i, layer, self._score(adapter, i, layer, stats), stats

    def _score(self, adapter, index: int, layer: nn.Module, stats: LayerStats, planned: bool = False) -> LayerScores:
        """`planned`: the block's counts are already decided (its keep-counts need no prices)."""
        score = self.pruner.score_for_plan if planned else self.pruner.score
        sc = score(adapter, index, layer, stats)
        stats.attn_factor = stats.ffn_factor = None  # the scores hold what is still needed
        return sc

    def score_layers(self, model, adapter, batches, device,
                     store: BlockStore | None = None) -> list[tuple[LayerScores, LayerStats]]:
        """Every layer's scores and statistics from one dense pass, pruning nothing: for decisions
        that need all layers first, and for studies of several budgets on one calibration."""
        scored = []
        for i, layer, stats in self._stream(model, adapter, batches, device, "dense", store):
            scored.append((self._score(adapter, i, layer, stats), stats))
        return scored

    def _stream(self, model, adapter, batches, device, propagate: str, store: BlockStore | None):
        """Iterate the layer stream, adding its forward time to the calibration time."""
        needs = self.pruner.requirements
        make = self.pruner.accumulator(self.backend) if needs.factorization and self.backend else None
        stream = LayerStream(model, adapter, batches, device, propagate, make, self.progress, self.stream,
                             moments=needs.moments, store=store, dense_targets=needs.dense_targets,
                             holds_activations=bool(make and self.backend and self.backend.holds_activations))
        yield from stream
        self._streamed += stream.seconds

    def _apply_stored(self, adapter: ModelAdapter, store: BlockStore,
                      scored: Callable[[int], tuple[LayerScores, LayerStats | None]], plans: list[LayerPlan]) -> None:
        """Prune every block to its plan, each moved to the device in turn; `scored(i)` gives block
        i's scores and statistics."""
        for i in tqdm(range(len(plans)), desc="prune", disable=not self.progress):
            sc, stats = scored(i)
            with store.block(i) as layer:
                self.pruner.apply(adapter, i, layer, sc, plans[i], stats)

    def apply_plans(self, adapter: ModelAdapter, scored: Sequence[tuple[LayerScores, LayerStats | None]],
                    plans: list[LayerPlan]) -> None:
        """Prune every layer to its plan (the model behind `adapter` may be a copy of the scored one)."""
        self._apply_stored(adapter, BlockStore(adapter.model, adapter, torch.device("cpu")), scored.__getitem__, plans)
