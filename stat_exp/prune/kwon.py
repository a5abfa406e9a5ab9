"""`kwon`: Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers".

1. Fisher importance (`prepare`): masks m = 1 multiply each head's output (input of O) and each
   FFN neuron (input of down) through forward pre-hooks; the gradient of the model's loss with
   respect to the masks is taken per calibration batch, and I = sum over batches of (dL/dm)^2.
   The loss is the task loss when the calibration batches carry labels (a GLUE task model with
   calib=glue, the paper's setting), else a causal LM's own loss (labels = input_ids, padding -100).
2. Mask search (`budget.allocation=global`): as the published MAC search, for every number of
   attention increments kept globally (best Fisher first), the remaining FLOPs go to the best
   neurons globally, and the split with the largest total Fisher importance wins. FLOPs come from
   the shared FlopsModel; every layer keeps at least its smallest attention level and `round_to`
   neurons (the paper may drop a whole layer); under grouped-query attention heads are added in
   the levels of `pruner.gqa` (a level's importance is the sum over the heads it adds). With
   `budget.allocation=uniform` the shared uniform allocation keeps each layer's best units.
3. Mask rearrangement (`rearrange`): the paper's greedy, per layer with the kept counts fixed:
   which units are pruned is re-picked so that the summed per-batch gradient of the pruned units
   is short (the block-diagonal Fisher estimate of the loss increase). Under `per_group` GQA it
   runs within each KV group (same number of heads per group), the other groups' pruned heads
   held fixed.
4. Mask tuning (`tune`): Kwon et al.'s layer-wise least squares as published (see
   `kwon_tuning`): the kept units' scales fit the teacher's sublayer output plus its residual
   minus the student's residual, on inputs propagated through the already-tuned layers; the
   teacher is the model masked at sqrt(target) kept FLOPs (their two-step schedule), untuned.

Fisher information comes from `fisher_examples` calibration examples (their default: 2,048),
drawn for this pruner alone, independent of calib.num_examples; the tuning uses the calibration
batches. The gradients do not depend on the budget, so a sweep over budgets can keep them in
`fisher_cache` (a file) and compute them once; a cache is used only when it was computed from the
same weights and examples, and replaced otherwise. Deviations: the paper's search may empty a
layer (here each keeps its floor), and its FLOPs come from the shared FlopsModel (Kwon's MAC count
x 2 for encoders).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stat_exp.calibrate import LayerStats, model_inputs
from stat_exp.errors import ConfigError
from stat_exp.execution.requirements import Requirements
from stat_exp.models.base import AttentionParts, ModelAdapter
from stat_exp.models.flops import FlopsModel, LayerShape
from stat_exp.models.hooks import Hooks
from stat_exp.prune.base import AllocationChoice, Pruner
from stat_exp.prune.budget import BudgetSpec, LayerPlan, allocate
from stat_exp.prune.global_rank import Increments
from stat_exp.prune.kwon_tuning import MaskTuner
from stat_exp.prune.scores import AttentionLevel, LayerScores, attention_units
from stat_exp.prune.surgery import head_channels, prune_attention, prune_ffn
from stat_exp.types import LABELS, GqaMode, PositiveFloat, PositiveInt

log = logging.getLogger(__name__)

SCHEDULE_STEPS = 2  # their get_pruning_schedule(target, num_iter=2): the teacher keeps target ** (1/2)


@dataclass
class KwonState:
    """One layer's Fisher importance (heads, neurons), which the search ranks, and its per-batch mask
    gradients (heads, neurons), which the rearrangement sums."""

    fisher: tuple[torch.Tensor, torch.Tensor]
    grads: tuple[torch.Tensor, torch.Tensor]


class KwonPruner(Pruner):
    name = "kwon"
    # gradients through the whole model; Fisher information and its own tuning streams: no layer statistics
    requirements = Requirements(layer_stream=False, whole_model=True)

    def __init__(self, gqa: GqaMode = "per_group", rearrange: bool = True, tune: bool = True,
                 max_scale: PositiveFloat = 10.0, allocation: AllocationChoice = "budget",
                 fisher_examples: PositiveInt | None = 2048, fisher_cache: str | None = None):
        """`rearrange`: the greedy rearrangement of which units are kept (counts fixed); `tune`: layer-wise
        least-squares scales of kept heads/neurons toward the teacher, as published (a fitted scale outside
        [-max_scale, max_scale] stops the tuning of this and later layers); `fisher_examples`: calibration
        examples for the Fisher information (their 2,048 by default; None: the calibration batches);
        `fisher_cache`: a file keeping the mask gradients between the jobs of a sweep."""
        super().__init__(gqa, allocation)
        self.rearrange, self.tune, self.max_scale = rearrange, tune, max_scale
        self.fisher_cache = Path(fisher_cache).expanduser() if fisher_cache else None
        self.requirements = Requirements(layer_stream=False, whole_model=True, examples=fisher_examples)
        self.grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._teacher_plans: dict[int, LayerPlan] = {}
        self._tuner: MaskTuner | None = None

    @property
    def variant(self) -> str:
        return ", ".join(p for p, on in (("no rearrangement", not self.rearrange), ("no tuning", not self.tune)) if on)

    def prepare(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                examples: list[dict[str, torch.Tensor]] | None = None) -> None:
        fisher = batches if examples is None else examples
        if not adapter.causal and not all(LABELS in b for b in fisher):
            raise ConfigError("pruner=kwon needs a loss: a causal LM, or a task model calibrated on labelled "
                              "data (calib=glue)")
        self.grads = cached_mask_gradients(model, adapter, fisher, self.fisher_cache)
        device = next(model.parameters()).device
        self._tuner = MaskTuner(model, adapter, batches, device, self.max_scale) if self.tune else None

    def score(self, adapter: ModelAdapter, index: int, layer: nn.Module,
              stats: LayerStats | None) -> LayerScores[KwonState, None]:
        attn = adapter.attention(layer)
        head_grads, neuron_grads = self.grads[index]
        heads, neurons = head_grads.square().sum(0), neuron_grads.square().sum(0)
        scores = self.ranked(adapter, layer, (heads / attn.head_dim).repeat_interleave(attn.head_dim), neurons)
        scores.state = KwonState(fisher=(heads, neurons), grads=(head_grads, neuron_grads))
        return scores

    def fixed_plans(self, layers: list[int], scores: list[LayerScores], shapes: list[LayerShape],
                    flops: FlopsModel, budget: BudgetSpec) -> list[LayerPlan] | None:
        """The search at the target and, for the tuning, the teacher's at sqrt(target)."""
        teacher = budget.flops ** (1 / SCHEDULE_STEPS)
        self._teacher_plans.update(zip(layers, self._search(scores, shapes, flops, budget, teacher)))
        return self._search(scores, shapes, flops, budget, budget.flops) if budget.allocation == "global" else None

    def _search(self, scores, shapes, flops: FlopsModel, budget: BudgetSpec, target: float) -> list[LayerPlan]:
        if budget.allocation != "global":
            return allocate(scores, shapes, flops, target, "uniform", budget.round_to)
        inc = Increments.build(scores, shapes, flops, budget.round_to, [sc.state.fisher for sc in scores], "sum")
        return inc.plans(mac_search(inc, inc.headroom(target)))

    def apply(self, adapter: ModelAdapter, index: int, layer: nn.Module, scores: LayerScores[KwonState, None],
              plan: LayerPlan, stats: LayerStats | None) -> None:
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        level = scores.attn_levels[plan.attn_level]
        neurons = scores.ffn_order[: plan.neurons].sort().values
        head_grads, neuron_grads = scores.state.grads
        if self.rearrange:
            level = self._rearranged_level(attn, level, head_grads)
            neurons = rearranged(neuron_grads, neurons, [list(range(ffn.width))])
        o_weight = down_weight = None
        if self._tuner is not None:
            teacher = self._teacher_plans[index]
            teacher_units = (list(scores.attn_levels[teacher.attn_level].heads), scores.ffn_order[: teacher.neurons])
            head_scales, neuron_scales = self._tuner.tune(index, layer, teacher_units, (list(level.heads), neurons))
            o_weight = _scaled(attn.o, head_channels(level.heads, attn.head_dim), head_scales, attn.head_dim)
            down_weight = _scaled(ffn.down, neurons, neuron_scales, 1)
        prune_attention(adapter, layer, level, o_weight)
        prune_ffn(adapter, layer, neurons, down_weight)
        if self._tuner is not None:
            self._tuner.advance(index, layer)

    def _rearranged_level(self, attn: AttentionParts, level: AttentionLevel, head_grads: torch.Tensor) -> AttentionLevel:
        """The level's counts with the units re-picked by the greedy rearrangement."""
        units = attention_units(attn.num_heads, attn.num_kv_heads, self.gqa)
        unit_grads = torch.stack([head_grads[:, u].sum(1) for u in units], 1)
        kept_units = torch.tensor([i for i, u in enumerate(units) if u[0] in level.heads])
        blocks = [list(range(len(units)))]
        if len(units) == attn.num_heads and attn.group_size > 1:  # per_group: the same count in every KV group
            blocks = [list(range(g * attn.group_size, (g + 1) * attn.group_size)) for g in range(attn.num_kv_heads)]
        kept = rearranged(unit_grads, kept_units, blocks).tolist()
        heads = sorted(h for i in kept for h in units[i])
        return AttentionLevel(tuple(heads), tuple(sorted({h // attn.group_size for h in heads})))


def _scaled(linear: nn.Linear, kept: torch.Tensor, scales: torch.Tensor | None, unit_size: int) -> torch.Tensor | None:
    """W[:, kept] with each kept unit's columns multiplied by its scale (None: no scales)."""
    if scales is None:
        return None
    W = linear.weight.detach().double().cpu()[:, kept.cpu()]
    return (W * scales.double().repeat_interleave(unit_size)).to(linear.weight.dtype)


def mac_search(inc: Increments, left: float) -> np.ndarray:
    """For each number of attention increments (best first), fill the rest with the best neurons;
    keep the split with the largest summed importance."""
    attn, ffn = inc.ranking(inc.is_attn), inc.ranking(~inc.is_attn)
    attn_flops, ffn_flops = (np.concatenate([[0.0], np.cumsum(inc.flops[o])]) for o in (attn, ffn))
    attn_score, ffn_score = (np.concatenate([[0.0], np.cumsum(inc.score[o])]) for o in (attn, ffn))
    best, choice = -np.inf, (0, 0)
    for n in range(len(attn) + 1):
        if attn_flops[n] > left:
            break
        m = int(np.searchsorted(ffn_flops, left - attn_flops[n], side="right")) - 1
        if attn_score[n] + ffn_score[m] > best:
            best, choice = attn_score[n] + ffn_score[m], (n, m)
    taken = np.zeros(len(inc.score), dtype=bool)
    taken[attn[: choice[0]]] = taken[ffn[: choice[1]]] = True
    return taken


def rearranged(grads: torch.Tensor, kept: torch.Tensor, blocks: list[list[int]]) -> torch.Tensor:
    """Kwon et al.'s greedy rearrangement of a layer's mask, the number kept in each block fixed.

    grads: (batches, units) per-batch mask gradients. Within a block, units are visited by
    increasing Fisher importance: the least important ones start pruned; each next one joins the
    pruned set, and then the member whose return to the kept set leaves the shortest summed
    pruned gradient S (other blocks' pruned units included) is returned; ||S - g_j||^2 is
    ranked as ||g_j||^2 - 2 g_j.S. Returns the kept units, sorted.
    """
    pruned_mask = torch.ones(grads.shape[1], dtype=torch.bool)
    pruned_mask[kept.cpu()] = False
    g = grads.double().cpu().T  # (units, batches)
    for block in blocks:
        members = torch.tensor(block)
        n_pruned = int(pruned_mask[members].sum())
        if n_pruned in (0, len(block)):
            continue
        gb = g[members]
        norms = gb.square().sum(1)
        visit = torch.argsort(norms, stable=True)
        pruned = torch.zeros(len(block), dtype=torch.bool)
        pruned[visit[:n_pruned]] = True
        total = g[pruned_mask].sum(0) - g[members][pruned_mask[members]].sum(0) + gb[pruned].sum(0)
        for unit in visit[n_pruned:].tolist():
            pruned[unit] = True
            total += gb[unit]
            back = int(torch.argmin((norms - 2 * gb @ total).masked_fill(~pruned, float("inf"))))
            pruned[back] = False
            total -= gb[back]
        pruned_mask[members] = pruned
    return torch.nonzero(~pruned_mask).flatten()


def mask_gradients(model: nn.Module, adapter: ModelAdapter,
                   batches: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (batches x heads, batches x neurons) gradients of the loss w.r.t. unit masks."""
    param = next(model.parameters())
    masks, hooks = [], Hooks()
    for layer in adapter.layers():
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        for linear, width, size in ((attn.o, attn.num_heads, attn.head_dim), (ffn.down, ffn.width, 1)):
            mask = torch.ones(width, dtype=param.dtype, device=param.device, requires_grad=True)
            hooks.pre(linear, _masking(mask, size))
            masks.append(mask)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    grads: list[list[torch.Tensor]] = [[] for _ in masks]
    try:
        with hooks, torch.enable_grad():
            for batch in batches:
                inputs = model_inputs(batch, param.device)
                labels = (batch[LABELS] if LABELS in batch
                          else inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100))
                targets = labels if isinstance(labels, dict) else {"labels": labels}  # QA: start/end positions
                loss = model(**inputs, **{k: v.to(param.device) for k, v in targets.items()}, use_cache=False).loss
                for acc, grad in zip(grads, torch.autograd.grad(loss, masks)):
                    acc.append(grad.detach().double().cpu())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    stacked = [torch.stack(g) for g in grads]
    return list(zip(stacked[0::2], stacked[1::2]))


def cached_mask_gradients(model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                          cache: Path | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`mask_gradients`, read from `cache` when it holds those of the same weights and examples, else
    computed and written there (atomically: jobs of a parallel sweep may share the file)."""
    if cache is None:
        return mask_gradients(model, adapter, batches)
    key = fingerprint(model, batches)
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == key:
            log.info("kwon: mask gradients read from %s", cache)
            return [tuple(pair) for pair in saved["grads"]]
        log.info("kwon: %s holds another model's or other examples' gradients; recomputing", cache)
    grads = mask_gradients(model, adapter, batches)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    torch.save({"key": key, "grads": grads}, partial)
    partial.replace(cache)
    return grads


def fingerprint(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> str:
    """A digest of the examples (every tensor) and the weights (names, shapes, sums)."""
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            values = batch[name] if isinstance(batch[name], dict) else {"": batch[name]}
            for part in sorted(values):
                tensor = values[part]
                digest.update(f"{name}/{part}{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for name, p in model.named_parameters():
        total, magnitude = torch.sum(p.detach(), dtype=torch.float64), torch.sum(p.detach().abs(), dtype=torch.float64)
        digest.update(f"{name}{tuple(p.shape)}{total.item():.17g}{magnitude.item():.17g}".encode())
    return digest.hexdigest()


def _masking(mask: torch.Tensor, size: int):
    """A pre-hook multiplying the input's channels by `mask`, each entry covering `size` channels."""
    def hook(module, args):
        return (args[0] * mask.repeat_interleave(size).to(args[0].dtype), *args[1:])
    return hook
