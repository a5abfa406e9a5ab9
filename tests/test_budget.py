"""The FLOPs budget: uniform and global allocation, rounding, and unreachable targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stat_exp.models.flops import FlopsModel, LayerShape
from stat_exp.prune.budget import BudgetError, allocate
from stat_exp.prune.scores import LayerScores, attention_levels

SMOLLM2 = LayerShape(hidden=576, head_dim=64, num_heads=9, num_kv_heads=3, ffn_width=1536, ffn_matrices=3)


def scores_for(shape: LayerShape, ffn_cost=None, attn_cost=None, gqa="per_group") -> LayerScores:
    units = shape.num_heads if gqa == "per_group" else shape.num_kv_heads
    levels = attention_levels(list(range(units)), shape.num_heads, shape.num_kv_heads, gqa)
    if ffn_cost is None:  # convex, decreasing: each neuron less useful than the last
        ffn_cost = np.cumsum(np.linspace(2, 1, shape.ffn_width)[::-1])[::-1]
        ffn_cost = np.append(ffn_cost, 0.0)
    if attn_cost is None:
        attn_cost = np.linspace(len(levels) - 1, 0, len(levels)) * 50.0
    return LayerScores(torch.arange(shape.ffn_width), np.asarray(ffn_cost, float), levels, np.asarray(attn_cost, float))


def kept_fraction(plans, scores, shapes, flops):
    kept = sum(flops.layer(sh, sc.attn_levels[p.attn_level].num_heads, sc.attn_levels[p.attn_level].num_kv_heads,
                           p.neurons) for p, sc, sh in zip(plans, scores, shapes))
    return kept / sum(flops.dense(sh) for sh in shapes)


@pytest.mark.parametrize("target,neurons,q", [(0.9, 1314, 3), (0.7, 1055, 2), (0.5, 612, 2)])
def test_uniform_matches_the_reference_counts(target, neurons, q):
    """Per-layer counts of the reference run in the notes (SmolLM2 at sequence length 256)."""
    plans = allocate([scores_for(SMOLLM2)] * 3, [SMOLLM2] * 3, FlopsModel(256), target, "uniform")
    for p in plans:
        assert p.neurons == neurons
        assert p.attn_level + 1 == q


@pytest.mark.parametrize("target", [0.95, 0.8, 0.6, 0.4])
@pytest.mark.parametrize("mode", ["global", "uniform"])
def test_allocation_meets_the_target_within_one_percent(target, mode):
    shapes = [SMOLLM2, LayerShape(576, 64, 9, 3, 1024, 3), SMOLLM2]
    scores = [scores_for(s) for s in shapes]
    flops = FlopsModel(256)
    plans = allocate(scores, shapes, flops, target, mode)
    assert kept_fraction(plans, scores, shapes, flops) == pytest.approx(target, abs=0.01)
    assert kept_fraction(plans, scores, shapes, flops) <= target + 1e-9 or mode == "uniform"


def test_global_takes_from_the_cheap_layer_first():
    cheap = scores_for(SMOLLM2, ffn_cost=np.linspace(1.0, 0.0, 1537))
    dear = scores_for(SMOLLM2, ffn_cost=np.linspace(1000.0, 0.0, 1537))
    plans = allocate([cheap, dear], [SMOLLM2] * 2, FlopsModel(256), 0.8, "global")
    assert plans[0].neurons < plans[1].neurons


def test_round_to_gives_multiples():
    plans = allocate([scores_for(SMOLLM2)] * 2, [SMOLLM2] * 2, FlopsModel(256), 0.7, "global", round_to=64)
    assert all(p.neurons % 64 == 0 for p in plans)


@pytest.mark.parametrize("target", [0.0, 1.5, -0.2])
def test_target_outside_the_unit_interval_is_rejected(target):
    with pytest.raises(BudgetError, match=r"budget.flops=.* must be in \(0, 1\]"):
        allocate([scores_for(SMOLLM2)], [SMOLLM2], FlopsModel(256), target)


def test_unknown_allocation_names_the_valid_ones():
    with pytest.raises(BudgetError, match="allowed: global, uniform"):
        allocate([scores_for(SMOLLM2)], [SMOLLM2], FlopsModel(256), 0.5, "greedy")


def test_unreachable_target_says_what_is_reachable():
    with pytest.raises(BudgetError, match=r"smallest reachable fraction 0\.141"):
        allocate([scores_for(SMOLLM2)], [SMOLLM2], FlopsModel(256), 0.05)


def test_flops_model_counts_each_matmul():
    f = FlopsModel(seq_len=10)
    shape = LayerShape(hidden=8, head_dim=2, num_heads=4, num_kv_heads=2, ffn_width=16, ffn_matrices=3)
    q_o = 2 * 8 * (4 * 2)       # q and o projections
    k_v = 2 * 8 * (2 * 2)       # k and v projections
    attn = 2 * 10 * (4 * 2)     # scores and context per query token
    assert f.attention(shape, 4, 2) == 2 * 10 * (q_o + k_v + attn)
    assert f.ffn(shape, 16) == 2 * 10 * 3 * 8 * 16


@pytest.mark.parametrize("seq_len", [25, 128])
def test_encoder_flops_are_twice_kwon_et_al_macs(seq_len):
    """For multi-head encoders the budget is Kwon et al.'s MAC count (x2): per head
    4 s d d_head + 2 s^2 d_head, per neuron 2 s d, so budget.seq_len=<task average> is their budget."""
    bert = LayerShape(hidden=768, head_dim=64, num_heads=12, num_kv_heads=12, ffn_width=3072, ffn_matrices=2)
    s, d, hd = seq_len, 768, 64
    for heads, neurons in [(12, 3072), (5, 1000), (1, 1)]:
        macs = heads * (4 * s * d * hd + 2 * s * s * hd) + neurons * 2 * s * d
        assert FlopsModel(seq_len).layer(bert, heads, heads, neurons) == 2 * macs
