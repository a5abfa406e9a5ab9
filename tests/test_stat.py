"""STAT on tiny models: exact on low-rank layers, identity when keeping all, and the correction
strictly lowers the layer output error for neurons and for heads."""
from __future__ import annotations

import pytest
import torch

from stat_exp.calibrate import ChannelMoments, LayerStream
from stat_exp.factorize import GramBackend, QRBackend, RankError
from stat_exp.models import get_adapter
from stat_exp.prune.budget import BudgetError, BudgetSpec, LayerPlan
from stat_exp.prune.flap import FlapPruner
from stat_exp.prune.runner import PruneRunner
from stat_exp.prune.stat import StatPruner
from stat_exp.prune.wanda import WandaPruner
from tests.tiny import batches, clone, tiny_gemma2, tiny_llama

CPU = torch.device("cpu")


def low_rank_ffn(model, r: int) -> None:
    """Make every FFN's hidden activations rank r: neuron j repeats neuron j mod r, scaled."""
    for layer in get_adapter(model).layers():
        mlp = layer.mlp
        with torch.no_grad():
            width = mlp.up_proj.out_features
            src = torch.arange(width) % r
            scale = torch.linspace(0.5, 2.0, width)[:, None]
            mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[src])
            mlp.up_proj.weight.copy_(mlp.up_proj.weight[src] * scale)


def prune_layers(model, pruner, plan_for, backend=None, propagate="dense"):
    """Score and apply every layer with explicit plans (bypassing the budget)."""
    adapter = get_adapter(model)
    stream = LayerStream(model, adapter, batches(), CPU, propagate, (backend or GramBackend("cpu", "float64")).accumulator,
                         progress=False)
    for i, layer, stats in stream:
        scores = pruner.score(adapter, i, layer, stats)
        pruner.apply(adapter, i, layer, scores, plan_for(scores, adapter.ffn(layer).width), stats)
    return adapter


def test_keeping_r_neurons_of_a_rank_r_ffn_reproduces_the_dense_model():
    model = tiny_llama(ffn=96)
    low_rank_ffn(model, r=10)
    x = batches(1, seed=5)[0]
    ref = model(**x).logits
    adapter = prune_layers(model, StatPruner(), lambda sc, width: LayerPlan(len(sc.attn_levels) - 1, 10))
    assert adapter.structure()["neurons"] == [10, 10]
    torch.testing.assert_close(model(**x).logits, ref, rtol=1e-5, atol=1e-5)


def test_without_correction_the_same_low_rank_selection_is_not_exact():
    model = tiny_llama(ffn=96)
    low_rank_ffn(model, r=10)
    x = batches(1, seed=5)[0]
    ref = model(**x).logits
    prune_layers(model, StatPruner(correction=False), lambda sc, width: LayerPlan(len(sc.attn_levels) - 1, 10))
    assert (model(**x).logits - ref).abs().max() > 1e-3


def test_keeping_everything_is_the_identity():
    model = tiny_llama()
    x = batches(1, seed=5)[0]
    ref = model(**x).logits
    prune_layers(model, StatPruner(), lambda sc, width: LayerPlan(len(sc.attn_levels) - 1, width))
    torch.testing.assert_close(model(**x).logits, ref, rtol=1e-6, atol=1e-6)


def _module_input_output(model, module_of_layer, layer_index=0):
    """(input, output) of one projection over the calibration batches of layer 0's stream."""
    adapter = get_adapter(model)
    module = module_of_layer(adapter, adapter.layers()[layer_index])
    seen = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append((a[0].detach(), out.detach())))
    with torch.no_grad():
        for b in batches():
            model(**b)
    handle.remove()
    return torch.cat([s[0].flatten(0, 1) for s in seen]), torch.cat([s[1].flatten(0, 1) for s in seen])


@pytest.mark.parametrize("part", ["ffn", "heads"])
def test_correction_strictly_reduces_the_layer_output_error(part):
    """Same selection, with and without the folded correction: error of the projection output
    (down or O) against the dense one, on the calibration tokens."""
    base = tiny_llama(layers=1)
    pick = (lambda a, l: a.ffn(l).down) if part == "ffn" else (lambda a, l: a.attention(l).o)
    X, Y = _module_input_output(base, pick)
    errors = {}
    for correction in (True, False):
        model = clone(base)
        plan = (lambda sc, w: LayerPlan(len(sc.attn_levels) - 1, w // 2)) if part == "ffn" else \
               (lambda sc, w: LayerPlan(0, w))
        adapter = prune_layers(model, StatPruner(correction=correction), plan)
        layer = adapter.layers()[0]
        kept = _kept_inputs(adapter, layer, base, part)
        errors[correction] = float((X[:, kept] @ pick(adapter, layer).weight.detach().T - Y).square().sum())
    assert errors[True] < 0.9 * errors[False]


def _kept_inputs(adapter, layer, base, part):
    """Indices of the dense projection inputs that the pruned projection still reads."""
    if part == "ffn":  # kept neurons: match pruned up_proj rows against the dense ones
        dense = get_adapter(base).ffn(get_adapter(base).layers()[0]).up.weight
        return torch.tensor([int((dense - row).abs().sum(1).argmin()) for row in adapter.ffn(layer).up.weight])
    attn = adapter.attention(layer)
    dense_q = get_adapter(base).attention(get_adapter(base).layers()[0]).q.weight
    rows = [int((dense_q - row).abs().sum(1).argmin()) for row in attn.q.weight]
    return torch.tensor(rows)


@pytest.mark.parametrize("gqa", ["per_group", "whole_groups"])
def test_gqa_structures_stay_valid_and_generate(gqa):
    model = tiny_llama(heads=8, kv_heads=2, layers=2)
    out = PruneRunner(StatPruner(gqa=gqa), BudgetSpec(flops=0.5, seq_len=32), GramBackend(), progress=False).run(
        model, get_adapter(model), batches(), CPU)
    s = out.structure
    for heads, kv in zip(s["heads"], s["kv_heads"]):
        assert heads % kv == 0
        if gqa == "per_group":
            assert kv == 2
        else:
            assert heads == 4 * kv
    ids = batches(1)[0]["input_ids"][:2, :6]
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 10)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_propagate_pruned_feeds_later_blocks_the_pruned_outputs(allocation):
    """Block 0 sees the same inputs either way; block 1 must see block 0's pruned outputs, so its
    correction differs from dense propagation (a silently dense run would give identical weights)."""
    pruned, dense = tiny_llama(), None
    dense = clone(pruned)
    spec = BudgetSpec(flops=0.6, seq_len=32, allocation=allocation)
    for model, propagate in ((pruned, "pruned"), (dense, "dense")):
        out = PruneRunner(StatPruner(), spec, GramBackend(block_dtype="float64"), propagate=propagate,
                          progress=False).run(model, get_adapter(model), batches(), CPU)
        assert out.achieved["flops_fraction"] == pytest.approx(0.6, abs=0.01)
        assert torch.isfinite(model(**batches(1)[0]).logits).all()
    down = [[get_adapter(m).ffn(layer).down.weight for layer in get_adapter(m).layers()] for m in (pruned, dense)]
    if down[0][0].shape == down[1][0].shape:
        torch.testing.assert_close(down[0][0], down[1][0])
    assert down[0][1].shape != down[1][1].shape or not torch.allclose(down[0][1], down[1][1], atol=1e-6)


def test_the_pruned_pass_of_a_global_allocation_prunes_as_if_priced():
    """Once the counts are decided, the pruned pass skips the cost curves (score_for_plan): the
    model it leaves is the one the fully priced scores would leave."""
    class Priced(StatPruner):
        def score_for_plan(self, adapter, index, layer, stats):
            return self.score(adapter, index, layer, stats)

    spec = BudgetSpec(flops=0.6, seq_len=32, allocation="global")
    models = [tiny_llama(), None]
    models[1] = clone(models[0])
    for model, pruner in zip(models, (StatPruner(), Priced())):
        PruneRunner(pruner, spec, GramBackend(block_dtype="float64"), propagate="pruned",
                    progress=False).run(model, get_adapter(model), batches(), CPU)
    x = batches(1, seed=3)[0]
    assert get_adapter(models[0]).structure() == get_adapter(models[1]).structure()
    torch.testing.assert_close(models[0](**x).logits, models[1](**x).logits, rtol=0, atol=0)


def test_qr_backend_runs_the_same_pipeline():
    a, b = tiny_llama(), None
    b = clone(a)
    spec = BudgetSpec(flops=0.6, seq_len=32)
    sa = PruneRunner(StatPruner(), spec, GramBackend(block_dtype="float64"), progress=False).run(a, get_adapter(a), batches(), CPU)
    sb = PruneRunner(StatPruner(), spec, QRBackend(), progress=False).run(b, get_adapter(b), batches(), CPU)
    assert sa.structure == sb.structure
    x = batches(1, seed=3)[0]
    torch.testing.assert_close(a(**x).logits, b(**x).logits, rtol=1e-4, atol=1e-4)


def test_unreachable_budget_is_a_clear_error():
    model = tiny_llama()
    with pytest.raises(BudgetError, match="below the smallest reachable"):
        PruneRunner(StatPruner(), BudgetSpec(flops=0.01, seq_len=32), GramBackend(), progress=False).run(
            model, get_adapter(model), batches(), CPU)


def test_too_few_calibration_tokens_for_the_rank_is_a_clear_error():
    model = tiny_llama(ffn=128)
    few = [{"input_ids": torch.randint(3, 90, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}]
    with pytest.raises(RankError, match="calibration has 8 tokens"):
        PruneRunner(StatPruner(), BudgetSpec(flops=0.7, seq_len=32), GramBackend(), progress=False).run(
            model, get_adapter(model), few, CPU)


def test_padding_never_enters_the_statistics():
    """Padding the same sequences differently must not change what STAT keeps."""
    results = []
    base = tiny_llama()
    for pad in (0, 6):
        model = clone(base)
        data = batches(pad_last=0)
        if pad:  # same real tokens, plus padding columns at the end with junk ids
            data = [{"input_ids": torch.cat([b["input_ids"], torch.randint(3, 90, (4, pad))], 1),
                     "attention_mask": torch.cat([b["attention_mask"], torch.zeros(4, pad, dtype=torch.long)], 1)}
                    for b in data]
        # uniform counts: a global allocation may flip near-ties on float rounding of the masks
        out = PruneRunner(StatPruner(), BudgetSpec(flops=0.6, seq_len=32, allocation="uniform"),
                          GramBackend(block_dtype="float64"), progress=False).run(model, get_adapter(model), data, CPU)
        results.append((out.structure, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    for p0, p1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(p0, p1, rtol=1e-6, atol=1e-6)


def test_one_forward_per_batch_and_block_by_block_give_the_same_statistics():
    """Dense propagation accumulates all blocks in ordinary forward passes; the block-by-block
    order (used for backends that hold activations) must see exactly the same inputs."""
    model = tiny_llama()
    adapter = get_adapter(model)
    make = GramBackend(block_dtype="float64").accumulator
    streams = [LayerStream(model, adapter, batches(pad_last=4), CPU, "dense", make, progress=False, stream=m)
               for m in ("model", "block")]
    for (i, _, a), (j, _, b) in zip(*streams):
        assert i == j and a.n_tokens == b.n_tokens
        assert a.typical_energy == pytest.approx(b.typical_energy, rel=1e-6)
        torch.testing.assert_close(a.ffn_factor.gram(), b.ffn_factor.gram(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.attn.sum, b.attn.sum, rtol=1e-5, atol=1e-6)


def test_typical_energy_ignores_a_few_massive_tokens():
    """A handful of tokens with massive activations must not make a block look cheap to prune."""
    from stat_exp.calibrate import LayerStats

    stats = LayerStats()
    stats.add_token_energy(torch.ones(99, dtype=torch.float64))
    stats.add_token_energy(torch.tensor([1e6], dtype=torch.float64))  # past the (empty) capacity: grows
    assert stats.n_tokens == 100 and stats.typical_energy == pytest.approx(100.0)


def test_errors_are_priced_after_a_post_norm():
    """Gemma 2 normalises each sublayer's output before adding it to the residual stream, so scaling
    a sublayer's output weights changes nothing downstream: it must not change what STAT keeps either
    (priced before the post-norm, those heads would look 64x costlier)."""
    torch.manual_seed(0)
    model = tiny_gemma2(layers=3)
    scaled = clone(model)
    for module in (*model.modules(), *scaled.modules()):
        if hasattr(module, "eps"):
            module.eps = 1e-12  # the norms' epsilon is the only thing the scaling could still reach
    with torch.no_grad():
        scaled.model.layers[0].self_attn.o_proj.weight.mul_(8.0)
        scaled.model.layers[1].mlp.down_proj.weight.mul_(0.125)
    data = batches(n=3, seq=24)
    torch.testing.assert_close(scaled(data[0]["input_ids"]).logits, model(data[0]["input_ids"]).logits, atol=1e-4, rtol=0)
    plans = []
    for m in (model, scaled):
        outcome = PruneRunner(StatPruner(), BudgetSpec(0.6, 24), GramBackend(), progress=False).run(
            m, get_adapter(m), data, CPU)
        plans.append(outcome.structure)
    assert plans[0] == plans[1]
    stats = next(iter(LayerStream(model, get_adapter(model), data, CPU, "dense", GramBackend().accumulator,
                                  progress=False)))[2]
    assert stats.attn_gain.n_tokens == stats.n_tokens and stats.attn_gain.value != 1.0
    llama = tiny_llama()
    llama_stats = next(iter(LayerStream(llama, get_adapter(llama), data, CPU, "dense", GramBackend().accumulator,
                                        progress=False)))[2]
    assert llama_stats.ffn_gain.value == 1.0  # no post-norm: priced as before


def test_norm_gain_is_the_post_norms_squared_scale_per_token():
    from stat_exp.calibrate import NormGain

    y = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # the same direction at two scales
    gain = NormGain()
    gain.update(y, y / y.norm(dim=-1, keepdim=True) * 2.0)  # a norm to length 2
    assert gain.n_tokens == 2 and gain.value == pytest.approx((4.0 / 25.0 * 4.0 / 0.25) ** 0.5)  # geometric mean
    assert NormGain().value == 1.0


@pytest.mark.parametrize("make,moments", [(StatPruner, False), (WandaPruner, True), (FlapPruner, True)])
def test_channel_moments_are_streamed_only_for_pruners_that_use_them(make, moments, monkeypatch):
    """Moments cost a pass over every activation; STAT prunes without them."""

    updates = []
    real_update = ChannelMoments.update
    monkeypatch.setattr(ChannelMoments, "update", lambda self, x: updates.append(1) or real_update(self, x))
    model = tiny_llama()
    PruneRunner(make(), BudgetSpec(flops=0.6, seq_len=32), GramBackend(), progress=False).run(
        model, get_adapter(model), batches(), CPU)
    assert bool(updates) == moments


def test_heads_are_ranked_by_their_contribution_after_w_o():
    """Head 0 carries the most activation energy but its W_O columns nearly erase it; head 1 carries
    little and has large W_O columns. What reaches the residual stream decides: keeping one head
    keeps head 1 (a ranking on the activations alone would keep head 0)."""
    model = tiny_llama(heads=4, kv_heads=4, hidden=32)
    adapter = get_adapter(model)
    attn = adapter.attention(adapter.layers()[0])
    hd = attn.head_dim
    with torch.no_grad():
        attn.o.weight.fill_(1.0)
        attn.o.weight[:, :hd] *= 1e-3
        attn.o.weight[:, hd:2 * hd] *= 10.0
    energy = torch.ones(4 * hd, dtype=torch.float64)
    energy[:hd] = 100.0
    _, levels, _ = StatPruner()._head_factorization(attn, torch.diag(energy))
    assert levels[0].heads == (1,) and 0 not in levels[2].heads  # head 0 is the first to go
