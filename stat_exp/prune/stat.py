"""`stat`: STAT, structured pruning by interpolative decomposition with a folded-in correction.

FFN: a column-pivoted factor of the hidden activations, columns weighted by the norms of their
output weights, ranks the neurons; the removed neurons are reconstructed from the kept ones,
Z_removed ~= Z_kept T, and T is folded into the down projection.
Heads: whole heads (or KV groups) are ranked by pivoting on their contributions after W_O; the
least-squares map from the kept head channels to the removed ones is folded into W_O.
The cost of a keep-count is the exact output error the corrected layer adds, relative to the
typical energy of the residual stream it is added to (n_tokens x the median token's squared norm),
so costs compare across layers. The median matters: from some block on, a few tokens carry massive
activations that dominate the summed energy (100x in SmolLM2 from block 12) and would make every
later block look cheap to prune.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stat_exp.calibrate import LayerStats
from stat_exp.factorize.base import Factorization, RankError, pivoted_cholesky
from stat_exp.models.base import ModelAdapter
from stat_exp.prune.base import AllocationChoice, Pruner
from stat_exp.prune.budget import LayerPlan
from stat_exp.prune.scores import AttentionLevel, GqaMode, LayerScores, attention_levels, attention_units
from stat_exp.prune.surgery import head_channels, prune_attention, prune_ffn

JITTER = 1e-10  # smallest relative ridge on the head Gram, for heads whose outputs are collinear


def _ridged_cholesky(G: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of G + eps I with the smallest eps (from JITTER up) that makes it succeed:
    a rank-deficient Gram (few tokens, dead heads, float32 blocks) still gets a stable factor."""
    scale = max(float(G.diagonal().mean()), 1e-300)
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    eps = JITTER
    while True:
        L, info = torch.linalg.cholesky_ex(G + eps * scale * eye)
        if int(info) == 0:
            return L
        eps *= 100


def nested_head_factor(levels: list[AttentionLevel], G: torch.Tensor, head_dim: int
                       ) -> tuple[Factorization, list[int]]:
    """Factor of the head-channel Gram `G` with channels in the levels' nested head order, so that
    every level's corrected error is a suffix sum; and the kept channel count of each level."""
    order, bounds, seen = [], [], set()
    for lv in levels:
        order += [h for h in lv.heads if h not in seen]
        seen.update(lv.heads)
        bounds.append(len(order) * head_dim)
    perm = head_channels(order, head_dim).to(G.device)
    R = _ridged_cholesky(G[perm][:, perm]).T
    weights = torch.ones(len(perm), dtype=torch.float64, device=G.device)
    return Factorization(perm=perm, R=R, weights=weights), bounds


class StatPruner(Pruner):
    name = "stat"
    needs_factorization = True

    def __init__(self, gqa: GqaMode = "per_group", correction: bool = True,
                 allocation: AllocationChoice = "budget"):
        """`correction=False`: the ablation "same selection, no correction"."""
        super().__init__(gqa, allocation)
        self.correction = correction

    @property
    def variant(self) -> str:
        return "" if self.correction else "no correction"

    def score(self, adapter: ModelAdapter, index: int, layer: nn.Module, stats: LayerStats | None) -> LayerScores:
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        scale = max(stats.typical_energy, 1e-300)
        W2 = ffn.down.weight.detach().double()  # everything below stays on the statistics' device
        ffn_fact = stats.ffn_factor.factorize(weights=W2.norm(dim=0))
        attn_fact, levels, bounds = self._head_factorization(attn, stats.attn_factor.gram())
        return LayerScores(
            ffn_order=ffn_fact.perm.cpu(),
            ffn_cost=(ffn_fact.output_error(W2) / scale).cpu().numpy(),
            attn_levels=levels,
            attn_cost=(attn_fact.output_error(attn.o.weight.detach().double())[bounds] / scale).cpu().numpy(),
            extra={"attn_bounds": bounds, "n_tokens": stats.n_tokens},
            heavy={"ffn": ffn_fact, "attn": attn_fact},
        )

    def _head_factorization(self, attn, G: torch.Tensor):
        """Rank heads (or KV groups) by pivoting on their contributions after W_O, then factor the
        head-channel Gram in that nested order so every level's corrected error is a suffix sum."""
        W = attn.o.weight.detach().double().to(G.device)
        units = attention_units(attn.num_heads, attn.num_kv_heads, self.gqa)
        member = torch.zeros(G.shape[0], len(units), dtype=G.dtype, device=G.device)  # channel -> its unit
        for j, u in enumerate(units):
            member[head_channels(u, attn.head_dim).to(G.device), j] = 1.0
        C = member.T @ ((W.T @ W) * G) @ member  # <O_a W_a^T, O_b W_b^T> summed per unit pair
        eye = torch.eye(len(units), dtype=C.dtype, device=C.device)
        unit_order, _ = pivoted_cholesky(C + JITTER * float(C.trace()) * eye)
        levels = attention_levels(unit_order.tolist(), attn.num_heads, attn.num_kv_heads, self.gqa)
        fact, bounds = nested_head_factor(levels, G, attn.head_dim)
        return fact, levels, bounds

    def apply(self, adapter: ModelAdapter, layer: nn.Module, scores: LayerScores, plan: LayerPlan,
              stats: LayerStats | None) -> None:
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        n_tokens = scores.extra["n_tokens"]
        level = scores.attn_levels[plan.attn_level]
        k_attn = scores.extra["attn_bounds"][plan.attn_level]
        for what, k in (("neurons", plan.neurons), ("head channels", k_attn)):
            if self.correction and k < (ffn.width if what == "neurons" else attn.o.in_features) and n_tokens < k:
                raise RankError(
                    f"calibration has {n_tokens} tokens but a layer keeps {k} {what}: the correction needs "
                    f"at least as many tokens as kept units (raise calib.num_examples or calib.seq_len)")
        o_weight = self._corrected(attn.o.weight, scores.heavy["attn"], k_attn)
        if o_weight is not None:  # columns follow the factor's order; put them in kept-head order
            kept = scores.heavy["attn"].perm[:k_attn].tolist()
            where = {c: i for i, c in enumerate(kept)}
            o_weight = o_weight[:, [where[int(c)] for c in head_channels(level.heads, attn.head_dim)]]
        prune_attention(adapter, layer, level, o_weight)
        keep = scores.ffn_order[: plan.neurons]
        prune_ffn(adapter, layer, keep, self._corrected(ffn.down.weight, scores.heavy["ffn"], plan.neurons))

    def _corrected(self, weight: torch.Tensor, fact: Factorization, k: int) -> torch.Tensor | None:
        """W[:, kept] + W[:, removed] T^T, the output weights with the removed units folded in."""
        if not self.correction or k >= weight.shape[1]:
            return None
        W = weight.detach().double().to(fact.R.device)
        kept, removed = fact.perm[:k], fact.perm[k:]
        return (W[:, kept] + W[:, removed] @ fact.correction(k).T).to(weight.dtype)
