"""Choose the global allocation's plan by what the pruned model outputs, on held-out batches.

The global allocation prices a block's error by a per-block proxy (its output error over the
residual energy); what that error does to the model's output differs between architectures, so
on some models the global plan loses to the uniform one. Here a few candidate plans (uniform, the
global plan, the global plan with every layer kept at or above a share of its uniform counts, and
the global plan on FFN costs measured off the fitted batches, which a fold that overfits some
layers more than others does not skew) are each applied to a copy of every block, and held-out
calibration examples (never used for the statistics) are streamed block by block through every
candidate's pruned blocks, beside the dense model. At the head, each candidate is scored by its divergence from the dense model's outputs (KL of
the output distributions where the model has logits, else the relative squared error of its last
hidden states); the lowest wins if it beats uniform by more than the noise of a few held-out
examples (NOISE_SE standard errors of the paired per-example difference), else uniform does.
Uniform is always a candidate, so on these batches the chosen plan is never worse than uniform.

Block at a time, as the runner works: one block's candidate copies exist at once; across blocks
only the held-out hidden states of the dense model and of each distinct candidate are kept
(candidates with the same plans so far share one stream).
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from stat_exp.calibrate import BlockBoundary, LayerStats, capture_block_inputs, model_inputs, replaced_forwards
from stat_exp.models.base import ModelAdapter
from stat_exp.prune.budget import BudgetSpec, FlopsModel, LayerPlan, LayerShape, allocate
from stat_exp.prune.scores import LayerScores

FLOORS = (0.5, 0.75)  # the mixtures: the global plan with every layer kept at >= this share of its uniform counts
NOISE_SE = 2.0  # a candidate replaces uniform only when better by more than this many standard errors
HEAD_TOKENS = 1024  # tokens scored at the head at once (logits of a large vocabulary are the peak)
UNIFORM, GLOBAL = "uniform", "global"
HELD_OUT_PRICED = "global, held-out FFN prices"  # the global plan on FFN costs measured off the fitted batches
OUTPUT_PRICED = "global, output-priced"  # the global plan with each block's prices x its output sensitivity
CHOOSING = ("held_out", "output_priced")  # budget.select values that choose among candidates


def max_candidates(select: str) -> int:
    """Candidates at most: uniform, global, the floored mixtures, the held-out-priced plan, and the
    output-priced plan when asked for."""
    return 3 + len(FLOORS) + (select == "output_priced")

Apply = Callable[[ModelAdapter, int, nn.Module, LayerScores, LayerPlan, LayerStats | None], None]


@dataclass
class Selection:
    """Which plan won and every candidate's held-out divergence (what results.json records)."""

    chosen: str
    scores: dict[str, float]
    measure: str
    held_out_tokens: int
    seconds: float
    cpu_seconds: float  # this process's CPU time (all threads): comparable on a shared machine
    plans: dict[str, list[LayerPlan]] = field(default_factory=dict, repr=False)
    sensitivity: list[float] | None = None  # each block's output sensitivity, where it priced a candidate
    best: str = UNIFORM  # the candidate with the lowest score (the chosen one unless within noise of uniform)
    t_vs_uniform: float = 0.0  # its paired difference to uniform over the held-out examples, in standard errors

    def record(self) -> dict:
        best_other = min((v for k, v in self.scores.items() if k != self.chosen), default=math.nan)
        return {"chosen": self.chosen, "measure": self.measure, "held_out": self.scores,
                "margin_to_next": best_other / self.scores[self.chosen] - 1 if self.scores[self.chosen] else math.nan,
                "vs_uniform": self.scores[self.chosen] / self.scores[UNIFORM] - 1 if self.scores[UNIFORM] else 0.0,
                "best": self.best, "t_vs_uniform": round(self.t_vs_uniform, 2),
                "held_out_tokens": self.held_out_tokens, "seconds": round(self.seconds, 2),
                "cpu_seconds": round(self.cpu_seconds, 2),
                **({"sensitivity": [float(f"{w:.4g}") for w in self.sensitivity]} if self.sensitivity else {})}


def selects_plan(budget: Mapping[str, Any], pruner) -> bool:
    """Whether a run chooses its global plan on held-out calibration batches: `budget.select` asks
    for it and the pruner's allocation is global (with calib.propagate=pruned the candidates are
    compared with corrections fitted on the dense stream, then the chosen plan is fitted on the pruned one)."""
    return budget.get("select", "held_out") in CHOOSING and pruner.allocation_under(budget["allocation"]) == GLOBAL


def floor_of(uniform: LayerPlan, scores: LayerScores, share: float) -> LayerPlan:
    """The smallest counts at or above `share` of a uniform plan's heads and neurons."""
    want = share * len(scores.attn_levels[uniform.attn_level].heads)
    level = next(i for i, lv in enumerate(scores.attn_levels) if lv.num_heads >= want - 1e-9)
    return LayerPlan(level, math.ceil(share * uniform.neurons))


def candidate_plans(scores: list[LayerScores], shapes: list[LayerShape], flops: FlopsModel,
                    budget: BudgetSpec, sensitivity: list[float] | None = None) -> dict[str, list[LayerPlan]]:
    """Uniform first, then the global plan and its floored mixtures; where every block's FFN costs
    were also measured on batches its correction was not fitted on, the global plan on those; given
    each block's output sensitivity (stat_exp.prune.sensitivity), the global plan on prices
    multiplied by it. A plan equal to an earlier candidate's is left out."""
    target, step = budget.flops, budget.round_to
    uniform = allocate(scores, shapes, flops, target, UNIFORM, step)
    out = {UNIFORM: uniform, GLOBAL: allocate(scores, shapes, flops, target, GLOBAL, step)}
    for share in FLOORS:
        floors = [floor_of(u, sc, share) for u, sc in zip(uniform, scores)]
        out[f"global, floor {share:g}"] = allocate(scores, shapes, flops, target, GLOBAL, step, minimum=floors)
    held_out = [sc.ffn_held_out_cost for sc in scores]
    if all(cost is not None for cost in held_out):
        out[HELD_OUT_PRICED] = allocate([replace(sc, ffn_cost=cost) for sc, cost in zip(scores, held_out)],
                                        shapes, flops, target, GLOBAL, step)
    if sensitivity is not None:
        priced = [replace(sc, attn_cost=sc.attn_cost * w, ffn_cost=sc.ffn_cost * w) for sc, w in zip(scores, sensitivity)]
        out[OUTPUT_PRICED] = allocate(priced, shapes, flops, target, GLOBAL, step)
    unique: dict[str, list[LayerPlan]] = {}
    for name, plans in out.items():
        if plans not in unique.values():
            unique[name] = plans
    return unique


class HeldOutStreams:
    """The held-out examples at the current block boundary: the dense model's hidden states and one
    stream per distinct candidate prefix, advanced one block at a time (`step`), scored at the
    head (`finish`)."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                 device: torch.device, home: torch.device, candidates: dict[str, list[LayerPlan]], apply: Apply):
        self.model, self.adapter, self.batches, self.device = model, adapter, batches, device
        self.candidates, self.apply = candidates, apply
        self.boundary: BlockBoundary = capture_block_inputs(model, adapter, batches, device, home)
        self.dense = self.boundary.hidden
        self.keys = {name: () for name in candidates}  # candidate -> the plans its stream has seen
        self.streams: dict[tuple, list[torch.Tensor]] = {(): self.dense}
        self.tuple_output = False

    @torch.inference_mode()
    def step(self, index: int, layer: nn.Module, scores: LayerScores, stats: LayerStats | None) -> None:
        """Advance every stream through block `index`: the dense one through `layer`, each candidate's
        through a copy of `layer` pruned to its plan (one copy per distinct stream and plan)."""
        advanced: dict[tuple, list[torch.Tensor]] = {}
        for name, plans in self.candidates.items():
            key = (*self.keys[name], _plan_key(plans[index]))
            if key not in advanced:
                block = copy.deepcopy(layer)
                self.apply(self.adapter, index, block, scores, plans[index], stats)
                advanced[key] = self._run(block, index, self.streams[self.keys[name]])
                del block
            self.keys[name] = key
        self.dense = self._run(layer, index, self.dense)
        self.streams = {(): self.dense, **advanced}

    def _run(self, block: nn.Module, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        out, self.tuple_output = run_block(block, index, hidden, self.boundary, self.device)
        return out

    @torch.inference_mode()
    def finish(self) -> tuple[dict[str, torch.Tensor], str, int]:
        """({candidate: each held-out example's divergence from the dense outputs}, the measure's
        name, tokens scored); an example's values are scaled so that they sum to the candidate's score."""
        parts: dict[tuple, list[torch.Tensor]] = {key: [] for key in self.streams if key}
        norm, measure, tokens = 0.0, "", 0
        for b, batch in enumerate(self.batches):
            rows = max(1, HEAD_TOKENS // batch["input_ids"].shape[-1])
            for start in range(0, batch["input_ids"].shape[0], rows):
                part = {k: v[start: start + rows] for k, v in batch.items()}
                mask = part["attention_mask"].to(self.device).bool()
                dense, logits = self._head(part, self.dense[b][start: start + rows])
                for key in parts:
                    pruned, _ = self._head(part, self.streams[key][b][start: start + rows])
                    values, measure, n = _divergence(dense, pruned, mask, logits)
                    parts[key].append(values)
                if measure == "relative squared error":
                    norm += float(_per_example(dense.float().square().sum(-1), mask).sum())
                tokens += n
        scale = norm if norm else tokens
        return {name: torch.cat(parts[key]) / scale for name, key in self.keys.items()}, measure, tokens

    def _head(self, batch: dict[str, torch.Tensor], final: torch.Tensor) -> tuple[torch.Tensor, bool]:
        return head_output(self.model, self.adapter, batch, final, self.device, self.tuple_output)


def run_block(block: nn.Module, index: int, hidden: list[torch.Tensor], boundary: BlockBoundary,
              device: torch.device) -> tuple[list[torch.Tensor], bool]:
    """Block `index` applied to every batch's hidden states with its own call arguments: (the outputs,
    kept where the inputs were; whether the block returns a tuple)."""
    out, tuple_output = [], False
    for h, calls in zip(hidden, boundary.calls):
        call = calls[index]
        y = block(h.to(device), *call.args, **call.kwargs)
        tuple_output = isinstance(y, tuple)
        out.append((y[0] if tuple_output else y).to(h.device))
    return out, tuple_output


def head_output(model: nn.Module, adapter: ModelAdapter, batch: dict[str, torch.Tensor], final: torch.Tensor,
                device: torch.device, tuple_output: bool) -> tuple[torch.Tensor, bool]:
    """The model's output for `batch` with every block skipped and the last one returning `final`:
    (its logits, True), or (its last hidden states, False) for a model without a head."""
    layers = adapter.layers()

    def forward_of(i: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = final.to(hidden.device) if i == len(layers) - 1 else hidden
            return (out,) if tuple_output else out
        return forward

    with replaced_forwards(layers, forward_of):
        out = model(**model_inputs(batch, device), use_cache=False)
    logits = getattr(out, "logits", None)
    return (logits, True) if logits is not None else (out[0], False)


def _plan_key(plan: LayerPlan) -> tuple[int, int]:
    return plan.attn_level, plan.neurons


def _per_example(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values summed over each example's real tokens (per-example values, e.g. a
    classifier's, stay as they are)."""
    return (values * mask).sum(-1) if values.shape == mask.shape else values.reshape(len(mask), -1).sum(-1)


def _divergence(dense: torch.Tensor, pruned: torch.Tensor, mask: torch.Tensor, logits: bool
                ) -> tuple[torch.Tensor, str, int]:
    """(per-example summed divergence, measure name, items): KL(dense || pruned) summed over each
    example's tokens (or per example) for logits, else the summed squared error of the hidden states
    (the caller divides by the dense energy)."""
    items = int(mask.sum()) if dense.shape[:-1] == mask.shape else len(mask)
    if logits:
        p = torch.log_softmax(dense.float(), -1)
        q = torch.log_softmax(pruned.float(), -1)
        kl = (p.exp() * (p - q)).sum(-1).clamp_min(0)  # >= 0 up to rounding
        return _per_example(kl, mask).double().cpu(), "kl", items
    err = (dense.float() - pruned.float()).square().sum(-1)
    return _per_example(err, mask).double().cpu(), "relative squared error", items


def within_noise(candidate: torch.Tensor, uniform: torch.Tensor) -> tuple[bool, float]:
    """(whether `candidate` is not better than `uniform` by more than NOISE_SE standard errors of
    their paired per-example difference, that difference's mean in standard errors)."""
    diff = candidate - uniform
    if len(diff) < 2:
        return bool(diff.sum() >= 0), 0.0
    mean, se = float(diff.mean()), float(diff.std()) / math.sqrt(len(diff))
    if se == 0:  # every example moved by the same amount
        return mean >= 0, 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / se > -NOISE_SE, mean / se


def choose_plan(candidates: dict[str, list[LayerPlan]], blocks: Iterable[tuple[int, nn.Module, LayerScores,
                LayerStats | None]], model: nn.Module, adapter: ModelAdapter,
                held_out: list[dict[str, torch.Tensor]], device: torch.device, home: torch.device,
                apply: Apply, progress: bool = False, sensitivity: list[float] | None = None,
                clock: tuple[float, float] | None = None) -> Selection:
    """Stream `held_out` through every candidate's pruned blocks (`blocks`: every block in order,
    on the device, with its scores and statistics) and pick the plan closest to the dense model.
    `sensitivity`: the output sensitivity that priced a candidate (recorded); `clock`: (wall, CPU)
    time the selection began, when it began before this call (with the sensitivity)."""
    start, cpu = clock or (time.perf_counter(), time.process_time())
    streams = HeldOutStreams(model, adapter, held_out, device, home, candidates, apply)
    for index, layer, scores, stats in tqdm(blocks, total=len(adapter.layers()), desc="choose plan",
                                            disable=not progress):
        streams.step(index, layer, scores, stats)
    per_example, measure, tokens = streams.finish()
    divergence = {name: float(values.sum()) for name, values in per_example.items()}
    best = min(divergence, key=lambda name: (divergence[name], name != UNIFORM))
    noise, t = within_noise(per_example[best], per_example[UNIFORM])
    chosen = UNIFORM if noise else best
    return Selection(chosen, divergence, measure, tokens, time.perf_counter() - start, time.process_time() - cpu,
                     candidates, sensitivity, best, t)
