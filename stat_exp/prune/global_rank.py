"""Plans from one ranking of units across all layers, for pruners whose published global search
is a threshold or a fill over every layer's units at once (FLAP, Kwon et al.), which the shared
Lagrangian allocation (minimum summed cost per FLOP) does not reproduce.

Every layer keeps the same floor as `allocate` (its smallest attention level and its first neuron
option). Beyond the floor a layer offers two chains of increments: the next attention level, and
the next `round_to` neurons of its ranking. An increment has a score (the pruner's, reduced over
the units it adds by sum or mean) and a FLOPs price. Scores along a chain are made non-increasing
(running minimum), so a ranking by score, ties broken by chain position, adds a chain in order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stat_exp.models.flops import FlopsModel, LayerShape
from stat_exp.prune.budget import BudgetError, LayerPlan, neuron_options
from stat_exp.prune.scores import LayerScores

REDUCTIONS = ("sum", "mean")


@dataclass
class Increments:
    """The optional increments of all layers, one entry each."""

    layer: np.ndarray  # int: which layer
    is_attn: np.ndarray  # bool: attention level (True) or neuron chunk (False)
    position: np.ndarray  # int: place in its chain
    score: np.ndarray
    flops: np.ndarray
    floor: float  # FLOPs of every layer's floor together
    dense: float  # FLOPs of the dense model
    neuron_options: list[np.ndarray]

    @classmethod
    def build(cls, scores: list[LayerScores], shapes: list[LayerShape], flops: FlopsModel, round_to: int,
              unit_scores: list[tuple[torch.Tensor, torch.Tensor]], reduce: str) -> "Increments":
        """`unit_scores[i]`: (per query head, per neuron) scores of layer i, in original indices."""
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce={reduce!r}; allowed: {', '.join(REDUCTIONS)}")
        parts, floor, dense, options = [], 0.0, 0.0, []
        for i, (sc, sh, (heads, neurons)) in enumerate(zip(scores, shapes, unit_scores)):
            level_flops = np.array([flops.attention(sh, lv.num_heads, lv.num_kv_heads) for lv in sc.attn_levels])
            added = [sorted(set(b.heads) - set(a.heads)) for a, b in zip(sc.attn_levels, sc.attn_levels[1:])]
            h = heads.double().cpu().numpy()
            attn_scores = np.array([h[a].sum() / (len(a) if reduce == "mean" else 1) for a in added])
            ks = neuron_options(sh.ffn_width, round_to)
            ordered = neurons.double().cpu().numpy()[sc.ffn_order.cpu().numpy()]
            chunk_sums = np.add.reduceat(ordered, ks[:-1]) if len(ks) > 1 else np.zeros(0)
            ffn_scores = chunk_sums / (np.diff(ks) if reduce == "mean" else 1)
            ffn_flops = np.array([flops.ffn(sh, int(k)) for k in ks])
            for is_attn, s, f in ((True, attn_scores, np.diff(level_flops)), (False, ffn_scores, np.diff(ffn_flops))):
                parts.append((np.full(len(s), i), np.full(len(s), is_attn), np.arange(len(s)),
                              np.minimum.accumulate(s), f))
            floor += level_flops[0] + ffn_flops[0]
            dense += flops.dense(sh)
            options.append(ks)
        layer, is_attn, position, score, price = (np.concatenate(c) for c in zip(*parts))
        return cls(layer.astype(int), is_attn.astype(bool), position.astype(int), score.astype(float),
                   price.astype(float), floor, dense, options)

    def headroom(self, target: float) -> float:
        """FLOPs left for increments once every layer has its floor, at `target` of the dense FLOPs."""
        left = target * self.dense - self.floor
        if left < -1e-7 * self.dense:
            raise BudgetError(f"budget.flops={target} is below the smallest reachable fraction "
                              f"{self.floor / self.dense:.3f} (one attention level and the first neuron option per layer)")
        return max(left, 0.0)

    def ranking(self, which: np.ndarray | None = None) -> np.ndarray:
        """Indices of the increments (all, or those selected by the mask `which`), best first."""
        idx = np.arange(len(self.score)) if which is None else np.flatnonzero(which)
        return idx[np.lexsort((self.position[idx], -self.score[idx]))]

    def fill(self, order: np.ndarray, left: float) -> np.ndarray:
        """Take increments in `order` while they fit in `left` FLOPs; one that does not fit ends its chain."""
        taken = np.zeros(len(self.score), dtype=bool)
        ended: set[tuple[int, bool]] = set()
        cheapest = float(self.flops.min()) if len(self.flops) else 0.0
        for j in order:
            if left < cheapest:
                break
            chain = (int(self.layer[j]), bool(self.is_attn[j]))
            if chain in ended:
                continue
            if self.flops[j] <= left:
                taken[j] = True
                left -= self.flops[j]
            else:
                ended.add(chain)
        return taken

    def plans(self, taken: np.ndarray) -> list[LayerPlan]:
        """Per-layer plans from taken increments (each chain's taken increments form a prefix)."""
        n = len(self.neuron_options)
        levels = np.bincount(self.layer[taken & self.is_attn], minlength=n)
        chunks = np.bincount(self.layer[taken & ~self.is_attn], minlength=n)
        return [LayerPlan(int(levels[i]), int(self.neuron_options[i][chunks[i]])) for i in range(n)]
