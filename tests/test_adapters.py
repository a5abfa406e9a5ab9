"""One test base for every adapter: identity when nothing is pruned, runnable when pruned,
a FLOPs model that matches the matmuls actually executed."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from stat_exp.factorize import GramBackend
from stat_exp.models import UnsupportedModelError, get_adapter
from stat_exp.prune.budget import FlopsModel
from stat_exp.prune.magnitude import MagnitudePruner
from stat_exp.prune.none import NoPruner
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.runner import PruneRunner, model_flops, shapes_of
from stat_exp.prune.stat import StatPruner
from tests.tiny import batches, clone, tiny_llama, tiny_mistral, tiny_opt, tiny_qwen2

CPU = torch.device("cpu")
MODELS = {
    "llama_gqa": lambda: tiny_llama(heads=8, kv_heads=2),
    "llama_mha_bias": lambda: tiny_llama(heads=4, kv_heads=4, bias=True),
    "qwen2_bias": lambda: tiny_qwen2(),
    "mistral_mqa": lambda: tiny_mistral(),
    "opt": lambda: tiny_opt(),
}


@pytest.fixture(params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def test_keep_everything_is_identity(model):
    x = batches(1)[0]
    ref = model(**x).logits
    for pruner in (NoPruner(), StatPruner()):
        m = clone(model)
        out = PruneRunner(pruner, BudgetSpec(flops=1.0, seq_len=32), GramBackend(), progress=False).run(
            m, get_adapter(m), batches(), CPU)
        assert out.achieved["flops_fraction"] == pytest.approx(1.0)
        torch.testing.assert_close(m(**x).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pruner", [StatPruner(), MagnitudePruner()], ids=["stat", "magnitude"])
def test_pruned_model_is_smaller_and_runs(model, pruner):
    dense_params = sum(p.numel() for p in model.parameters())
    out = PruneRunner(pruner, BudgetSpec(flops=0.6, seq_len=32), GramBackend(), progress=False).run(
        model, get_adapter(model), batches(), CPU)
    params = sum(p.numel() for p in model.parameters())
    assert params < dense_params and params == out.achieved["params"]
    assert out.achieved["flops_fraction"] == pytest.approx(0.6, abs=0.01)
    logits = model(**batches(1, pad_last=5)[0]).logits
    assert torch.isfinite(logits).all()
    assert model.generate(batches(1)[0]["input_ids"][:1, :8], max_new_tokens=3, do_sample=False).shape[1] == 11


def test_flops_model_matches_counted_matmuls(model):
    """Prune unevenly, then compare our count with torch's FLOP counter over the blocks (eager
    attention, so the score and context matmuls are counted too)."""
    adapter = get_adapter(model)
    PruneRunner(StatPruner(), BudgetSpec(flops=0.55, seq_len=32, allocation="global"), GramBackend(),
                progress=False).run(model, adapter, batches(), CPU)
    model.set_attn_implementation("eager")
    seq = 16
    with FlopCounterMode(display=False) as counter:
        model(**batches(1, batch=1, seq=seq)[0])
    per_module = counter.get_flop_counts()
    names = [n for n, m in model.named_modules() if any(m is layer for layer in adapter.layers())]
    counted = sum(sum(per_module[f"{type(model).__name__}.{n}"].values()) for n in names)
    assert counted == pytest.approx(model_flops(adapter, FlopsModel(seq)), rel=1e-9)


def test_structure_reports_per_layer_counts(model):
    adapter = get_adapter(model)
    s = adapter.structure()
    assert len(s["heads"]) == len(adapter.layers()) == len(shapes_of(adapter))
    assert s["neurons"][0] == adapter.ffn(adapter.layers()[0]).width


def test_unsupported_model_type_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UnsupportedModelError, match="supported: .*llama"):
        get_adapter(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))
