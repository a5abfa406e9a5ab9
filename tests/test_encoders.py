"""Encoder adapters (BERT, RoBERTa, DistilBERT; bare and with a task head) on tiny random models:
dispatch with or without a head, runnable with padded inputs when pruned, calibration that ignores
padding, Kwon et al.'s FLOPs share (the adapter contract itself is in test_adapters.py)."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    RobertaConfig,
    RobertaModel,
)

from stat_exp.factorize import GramBackend
from stat_exp.models import get_adapter
from stat_exp.models.encoders import BertAdapter, DistilBertAdapter
from stat_exp.models.flops import FlopsModel, LayerShape
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.runner import PruneRunner
from stat_exp.prune.stat import StatPruner
from tests.tiny import VOCAB, clone

CPU = torch.device("cpu")
PAD = 1  # a pad id that is also RoBERTa's padding_idx
BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            pad_token_id=PAD, attn_implementation="sdpa")
MODELS = {
    "bert": lambda: BertModel(BertConfig(**BERT)),
    "bert_cls": lambda: BertForSequenceClassification(BertConfig(**BERT, num_labels=3)),
    "roberta": lambda: RobertaModel(RobertaConfig(**BERT, max_position_embeddings=80)),
    "distilbert": lambda: DistilBertModel(DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, pad_token_id=PAD, attn_implementation="sdpa")),
    "distilbert_cls": lambda: DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, pad_token_id=PAD, num_labels=2,
        attn_implementation="sdpa")),
}


FAMILIES = ["bert_cls", "roberta", "distilbert"]  # one of each layout, with and without a head


@pytest.fixture(params=list(MODELS))
def model(request):
    return MODELS[request.param]().eval()


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return MODELS[request.param]().eval()


def output(model, batch) -> torch.Tensor:
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def padded(examples: list[torch.Tensor], batch_size: int, length: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Batches of the examples, right-padded to `length` (None: each batch's longest)."""
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        width = length or max(len(e) for e in chunk)
        ids = torch.full((len(chunk), width), PAD)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, e in enumerate(chunk):
            ids[row, :len(e)], mask[row, :len(e)] = e, 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def examples(n: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(6, 24, (1,), generator=g)),), generator=g) for _ in range(n)]


def stat_runner(flops: float, propagate: str = "dense") -> PruneRunner:
    return PruneRunner(StatPruner(), BudgetSpec(flops=flops, seq_len=32, allocation="global"), GramBackend(),
                       propagate, progress=False)


def test_dispatch_finds_the_blocks_with_or_without_a_head():
    for name, kind in (("bert", BertAdapter), ("bert_cls", BertAdapter), ("roberta", BertAdapter),
                       ("distilbert", DistilBertAdapter), ("distilbert_cls", DistilBertAdapter)):
        adapter = get_adapter(MODELS[name]())
        assert type(adapter) is kind and not adapter.causal
        assert adapter.structure() == {"heads": [4, 4], "kv_heads": [4, 4], "neurons": [64, 64]}


def test_pruned_model_is_smaller_and_ignores_padding(model):
    dense_params = sum(p.numel() for p in model.parameters())
    adapter = get_adapter(model)
    out = stat_runner(0.6).run(model, adapter, padded(examples(), 8), CPU)
    assert sum(p.numel() for p in model.parameters()) == out.achieved["params"] < dense_params
    assert out.achieved["flops_fraction"] == pytest.approx(0.6, abs=0.01)
    for layer, heads in zip(adapter.layers(), out.structure["heads"]):  # bookkeeping follows the slicing
        attn = adapter.attention(layer).module
        assert getattr(attn, "num_attention_heads", getattr(attn, "n_heads", None)) == heads
    tight, loose = padded(examples(4, seed=1), 4), padded(examples(4, seed=1), 4, length=40)
    a, b = output(model, tight[0]), output(model, loose[0])
    assert torch.isfinite(b).all()
    if a.dim() == 3:  # hidden states: compare real tokens only
        a, b = a[tight[0]["attention_mask"].bool()], b[:, : a.shape[1]][tight[0]["attention_mask"].bool()]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def assert_padding_does_not_change_the_selection(model, propagate: str) -> None:
    """Same examples, batched with different padding: same structure, same kept units, same corrections
    (up to float32 noise in the forward passes, which the least-squares corrections amplify a little)."""
    runs = []
    for length in (None, 40):
        m = clone(model)
        outcome = stat_runner(0.5, propagate).run(m, get_adapter(m), padded(examples(48), 8, length), CPU)
        runs.append((outcome.structure, m))
    (s1, m1), (s2, m2) = runs
    assert s1 == s2
    for (name, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-4, msg=name)


def test_padding_does_not_change_the_selection(family_model):
    assert_padding_does_not_change_the_selection(family_model, "dense")


def test_padding_does_not_change_the_selection_block_by_block():
    """propagate=pruned replays each block on captured inputs: the block must get its mask back
    (BERT-style blocks take it positionally)."""
    assert_padding_does_not_change_the_selection(MODELS["bert_cls"]().eval(), "pruned")


@pytest.mark.parametrize("seq_len", [25, 128])
def test_ffn_share_is_kwon_formula_for_bert_base(seq_len):
    shape = LayerShape(hidden=768, head_dim=64, num_heads=12, num_kv_heads=12, ffn_width=3072, ffn_matrices=2)
    flops = FlopsModel(seq_len)
    assert flops.ffn(shape, 3072) / flops.dense(shape) == pytest.approx(6144 / (9216 + 2 * seq_len), rel=1e-12)
