"""block_drop on tiny random Llama and OPT models: block influence against the hidden states the
model itself returns, the FLOPs budget, which blocks the structure says went, generation with the
renumbered KV cache, and a saved model that reloads as a stock checkpoint."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from stat_exp.export import load_pruned
from stat_exp.export.save import save_pruned
from stat_exp.models import get_adapter
from stat_exp.prune.block_drop import BlockDropPruner, block_influence, blocks_to_remove
from stat_exp.prune.budget import BudgetError
from tests.adapter_contract import one_thread  # noqa: F401 (fixture)
from tests.tiny import WHOLE_MODEL, calibration, probe, prune, whole_model

CALIB = calibration()
pytestmark = pytest.mark.usefixtures("one_thread")


def build(family: str) -> torch.nn.Module:
    return whole_model(family, layers=5)


def test_block_influence_is_one_minus_cosine_of_the_models_hidden_states():
    model = build("llama")
    hidden = [model(**b, output_hidden_states=True).hidden_states for b in CALIB]
    expected = []
    for i in range(5):
        a = torch.cat([h[i][b["attention_mask"].bool()] for h, b in zip(hidden, CALIB)]).double()
        out = torch.cat([h[i + 1][b["attention_mask"].bool()] for h, b in zip(hidden, CALIB)]).double()
        if i == 4:  # the model's last hidden state is after the final norm: take the block's own output
            continue
        expected.append(1 - torch.nn.functional.cosine_similarity(a, out, dim=-1).mean().item())
    assert block_influence(model, get_adapter(model), CALIB)[:4] == pytest.approx(expected, rel=1e-5)


def test_least_influential_blocks_go_until_the_budget_fits():
    assert blocks_to_remove([0.5, 0.1, 0.3, 0.05], [1.0] * 4, 0.5) == [1, 3]
    assert blocks_to_remove([0.5, 0.1, 0.3, 0.05], [1.0] * 4, 0.6) == [1, 3]  # whole blocks: at most the budget
    assert blocks_to_remove([0.5, 0.1], [1.0] * 2, 1.0) == []
    with pytest.raises(BudgetError):
        blocks_to_remove([0.5, 0.1], [1.0] * 2, 0.01)


@pytest.mark.parametrize("family", WHOLE_MODEL)
def test_block_drop_removes_blocks_and_the_model_runs(family, tmp_path, tokenizer):
    model = build(family)
    influence = block_influence(model, get_adapter(model), CALIB)
    dense_layers = list(get_adapter(model).layers())
    out = prune(BlockDropPruner(), model, 0.6)
    removed = out.structure["removed_blocks"]
    assert removed == sorted(torch.argsort(torch.tensor(influence))[:2].tolist())
    assert out.achieved["flops_fraction"] == pytest.approx(0.6)
    kept = [layer for i, layer in enumerate(dense_layers) if i not in removed]
    assert list(get_adapter(model).layers()) == kept and len(out.structure["heads"]) == 3
    assert model.config.num_hidden_layers == 3
    x = probe()
    assert model.generate(x["input_ids"][:1, :6], max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1] == 9
    save_pruned(model, tokenizer, tmp_path, "causal_lm")
    assert not (tmp_path / "modeling_stat_pruned.py").exists()  # a stock checkpoint with fewer layers
    for reloaded in (load_pruned(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert get_adapter(reloaded).structure() == out.structure
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**x).logits, model(**x).logits, rtol=1e-5, atol=1e-5)
