"""Perplexity against a hand computation with the model's own labels= loss, on a tiny random Llama."""

import math

import pytest
import torch

from stat_exp.assets import corpus_path
from stat_exp.data import DataError, encode, load_text
from stat_exp.eval.perplexity import perplexity


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper than the default init, so the loss differs per token
        model.lm_head.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def text():
    return load_text(str(corpus_path("pang_lee")))  # 200 real review sentences, ~5k tokens


def _reference(model, tokenizer, text, seq_len, max_tokens):
    ids = encode(tokenizer, text)[:max_tokens]
    n = ids.numel() // seq_len
    chunks = ids[: n * seq_len].view(n, seq_len)
    with torch.no_grad():
        losses = [model(c[None], labels=c[None]).loss.item() for c in chunks]
    return sum(losses) / n, n * (seq_len - 1)


def test_matches_labels_loss(model, tokenizer, text):
    result = perplexity(model, tokenizer, text, seq_len=64, max_tokens=1000, batch_size=4, progress=False)
    nll, tokens = _reference(model, tokenizer, text, 64, 1000)
    assert result["tokens"] == tokens == 15 * 63
    assert result["nll"] == pytest.approx(nll, rel=1e-4)
    assert result["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_batch_size_does_not_matter(model, tokenizer, text):
    a = perplexity(model, tokenizer, text, seq_len=32, max_tokens=320, batch_size=1, progress=False)
    b = perplexity(model, tokenizer, text, seq_len=32, max_tokens=320, batch_size=7, progress=False)
    assert a["tokens"] == b["tokens"] == 10 * 31
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5)


def test_max_tokens_and_ragged_tail(model, tokenizer, text):
    assert perplexity(model, tokenizer, text, 32, 100, 8, progress=False)["tokens"] == 3 * 31
    total = encode(tokenizer, text).numel()
    full = perplexity(model, tokenizer, text, 128, None, 16, progress=False)
    assert full["tokens"] == (total // 128) * 127


def test_restores_training_mode(model, tokenizer, text):
    model.train()
    try:
        perplexity(model, tokenizer, text, 16, 32, 2, progress=False)
        assert model.training
    finally:
        model.eval()


def test_too_short_text(model, tokenizer):
    with pytest.raises(DataError, match="fewer than one chunk of seq_len=64"):
        perplexity(model, tokenizer, "only a few words", 64, None, 2, progress=False)
    with pytest.raises(DataError, match="seq_len=64"):
        perplexity(model, tokenizer, "plenty " * 200, 64, 50, 2, progress=False)
