"""What a pruner hands to the allocator for one layer: orders of units and the cost of cutting.

Attention is described by a list of valid levels (which query and KV heads survive), smallest
first and the dense layout last, so grouped-query constraints live here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from stat_exp.types import GQA_MODES


@dataclass(frozen=True)
class AttentionLevel:
    """One valid attention layout: kept query heads and kept KV heads (original indices, sorted)."""

    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)


State = TypeVar("State")
Heavy = TypeVar("Heavy")


@dataclass
class LayerScores(Generic[State, Heavy]):
    """Ranked units of one layer and the cost of each keep-count.

    ffn_order: neuron indices, most important first. ffn_cost[k]: cost of keeping the first k
    (length width+1, 0 at the end). attn_levels / attn_cost: valid layouts and their costs.
    `state` carries small pruner-private state from scoring to allocating and applying; `heavy`
    the large state only `apply` needs (factorizations, Gram matrices): under a global allocation
    the runner may spill it to disk (torch.save) or drop it (None) and score the block again, so
    that what waits for the allocation does not grow with depth. Each is a dataclass of the
    pruner's own module, or None where the pruner has none. `ffn_held_out_cost`: the same costs
    as `ffn_cost`, measured on calibration batches the correction was not fitted on (None where
    not measured); it prices one of the candidate plans the global allocation chooses among.
    """

    ffn_order: torch.Tensor
    ffn_cost: np.ndarray
    attn_levels: list[AttentionLevel]
    attn_cost: np.ndarray
    state: State | None = None
    heavy: Heavy | None = None
    ffn_held_out_cost: np.ndarray | None = None


def head_rounds(head_order: list[int], num_heads: int, num_kv_heads: int) -> list[int]:
    """Reorder heads so that every prefix of r * num_kv_heads holds r heads of each KV group.

    Within a round the given order decides; this is the `per_group` layout for a score order.
    """
    group = num_heads // num_kv_heads
    rank_in_group: dict[int, int] = {}
    seen = [0] * num_kv_heads
    for h in head_order:
        rank_in_group[h] = seen[h // group]
        seen[h // group] += 1
    return sorted(head_order, key=lambda h: (rank_in_group[h], head_order.index(h)))


def attention_levels(order: list[int], num_heads: int, num_kv_heads: int, mode: str) -> list[AttentionLevel]:
    """Valid layouts from an importance order over units.

    `per_group`: `order` ranks query heads; level r keeps r query heads in every KV group.
    `whole_groups`: `order` ranks KV groups; level r keeps r groups with all their query heads.
    Multi-head attention (one query head per KV head) always prunes whole heads.
    """
    if mode not in GQA_MODES:
        raise ValueError(f"pruner.gqa={mode!r}; allowed: {', '.join(GQA_MODES)}")
    group = num_heads // num_kv_heads
    if mode == "per_group" and group > 1:
        ranked = head_rounds(order, num_heads, num_kv_heads)
        return [AttentionLevel(tuple(sorted(ranked[: r * num_kv_heads])), tuple(range(num_kv_heads)))
                for r in range(1, group + 1)]
    levels = []  # here `order` ranks KV groups (single heads under multi-head attention)
    for r in range(1, num_kv_heads + 1):
        kv = tuple(sorted(order[:r]))
        levels.append(AttentionLevel(tuple(h for g in kv for h in range(g * group, (g + 1) * group)), kv))
    return levels


def attention_units(num_heads: int, num_kv_heads: int, mode: str) -> list[list[int]]:
    """The head sets that `attention_levels` ranks: single query heads, or whole KV groups."""
    group = num_heads // num_kv_heads
    if mode == "per_group" and group > 1:
        return [[h] for h in range(num_heads)]
    return [list(range(g * group, (g + 1) * group)) for g in range(num_kv_heads)]
