"""SliceGPT on tiny random Llama (RMSNorm) and OPT (LayerNorm) models: the rotated, unsliced model
is the dense one; slicing meets the FLOPs (or parameter) budget with the shortcuts counted and the
FLOPs model matches torch's count of the sliced blocks; saved sliced models reload with
from_pretrained; other families get one line."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from stat_exp.errors import ConfigError
from stat_exp.export import load_pruned
from stat_exp.export.save import save_pruned
from stat_exp.models import get_adapter
from stat_exp.models.flops import FlopsModel, LayerShape, layer_weights, prunable_params, shapes_of
from stat_exp.prune.slicegpt import SliceGptPruner, layout_of, slice_model
from tests.adapter_contract import one_thread  # noqa: F401 (fixture)
from tests.tiny import WHOLE_MODEL, batches, calibration, clone, probe, prune, tiny_gpt2, whole_model

pytestmark = pytest.mark.usefixtures("one_thread")


def build(family: str) -> torch.nn.Module:
    model = whole_model(family, layers=3)
    for name, p in model.named_parameters():  # norms with non-trivial scales and shifts, so fusing matters
        if "norm" in name:
            p.data = 1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p)
    return model.double()


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch).logits
    return out[batch["attention_mask"].bool()]


def run(model: torch.nn.Module, flops: float, **options):
    return prune(SliceGptPruner(**options), model, flops)


@pytest.mark.parametrize("family", WHOLE_MODEL)
def test_rotated_unsliced_model_is_the_dense_model(family):
    """Rotated into the principal axes of calibration data at full width: the dense model's logits."""
    model = build(family)
    dense = clone(model).double()
    x = probe()
    n = len(get_adapter(model).layers())
    d = model.config.hidden_size
    slice_model(model, get_adapter(model), layout_of(model, get_adapter(model)), calibration(),
                [(d, d, d)] * n)
    torch.testing.assert_close(logits(model, x), logits(dense, x), rtol=1e-7, atol=1e-7)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("family", WHOLE_MODEL)
def test_full_budget_keeps_the_widest_width_that_fits(family):
    """At budget 1 the shortcuts still cost FLOPs: the width is the largest that fits, the LM head's input whole."""
    model = build(family)
    flops, shapes = FlopsModel(16), shapes_of(get_adapter(model))
    out = run(model, 1.0, round_to=1)
    d, dense = model.sliced_spec["dims"][0][0], model.config.hidden_size
    assert model.sliced_spec["dims"][-1][2] == dense and d < dense
    assert out.achieved["flops_fraction"] <= 1.0
    assert SliceGptPruner(round_to=1).widths(shapes, flops, out.achieved["flops_fraction"] + 1e-6)[0][0] == d
    wider = SliceGptPruner(round_to=1).widths(shapes, flops, 1.0)
    assert wider[0][0] == d


@pytest.mark.parametrize("family", WHOLE_MODEL)
def test_slicing_meets_the_flops_budget_and_the_model_runs(family):
    model = build(family)
    flops = FlopsModel(16)
    dense = sum(flops.dense(s) for s in shapes_of(get_adapter(model)))
    out = run(model, 0.6, round_to=4)
    adapter = get_adapter(model)
    sliced = sum(flops.dense(s) for s in shapes_of(adapter))
    assert out.achieved["flops_fraction"] == pytest.approx(sliced / dense) and 0.5 < sliced / dense <= 0.6
    assert all(s.shortcut > 0 for s in shapes_of(adapter))  # the shortcuts are counted
    d = model.sliced_spec["dims"][0][0]
    assert d < model.config.hidden_size and d % 4 == 0
    x = probe()
    assert torch.isfinite(logits(model, x)).all()
    assert model.generate(x["input_ids"][:1, :6], max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1] == 9


def test_params_match_meets_the_parameter_budget():
    model = build("llama")
    before = prunable_params(get_adapter(model))
    out = run(model, 0.6, match="params", round_to=1)
    after = prunable_params(get_adapter(model))
    assert out.achieved["params_fraction"] == pytest.approx(after / before)
    weights = sum(map(layer_weights, shapes_of(get_adapter(model))))
    assert weights <= 0.6 * before and after > 0.5 * before


@pytest.mark.parametrize("family", WHOLE_MODEL)
def test_flops_model_counts_the_sliced_blocks_and_shortcuts(family):
    model = build(family).float()
    run(model, 0.7, round_to=4)
    adapter = get_adapter(model)
    model.set_attn_implementation("eager")
    seq = 16
    with FlopCounterMode(display=False) as counter:
        model(**batches(1, batch=1, seq=seq)[0])
    counted = counter.get_flop_counts()
    names = {id(m): n for n, m in model.named_modules()}
    for layer in adapter.layers():
        shape = LayerShape.of(adapter.attention(layer), adapter.ffn(layer), sum(m.numel() for m in adapter.shortcuts(layer)))
        executed = sum(counted[f"{type(model).__name__}.{names[id(layer)]}"].values())
        assert executed == pytest.approx(FlopsModel(seq).dense(shape), rel=1e-9)


@pytest.mark.parametrize("family", WHOLE_MODEL)
def test_saved_sliced_model_reloads(family, tmp_path, tokenizer):
    model = build(family).float()
    run(model, 0.6, round_to=4)
    save_pruned(model, tokenizer, tmp_path, "causal_lm")
    assert (tmp_path / "modeling_sliced.py").exists() and (tmp_path / "modeling_stat_pruned.py").exists()
    x = probe()
    for reloaded in (load_pruned(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)):
        torch.testing.assert_close(logits(reloaded, x), logits(model, x), rtol=1e-5, atol=1e-5)
        assert reloaded.config.stat_exp_pruning["sliced"]["dims"] == model.sliced_spec["dims"]
    again = tmp_path / "again"  # a reloaded sliced model saves again
    save_pruned(load_pruned(tmp_path), tokenizer, again, "causal_lm")
    torch.testing.assert_close(logits(load_pruned(again), x), logits(model, x), rtol=1e-5, atol=1e-5)


def test_other_families_get_one_line():
    torch.manual_seed(0)
    model = tiny_gpt2()
    with pytest.raises(ConfigError, match="Llama-family and OPT"):
        run(model, 0.6)
