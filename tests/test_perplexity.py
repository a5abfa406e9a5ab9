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


def _second_half_reference(model, ids, seq_len, max_tokens, first_token=None):
    """llama-perplexity's protocol by hand: labels mask the first half of every window."""
    ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    chunks = ids[: n * seq_len].view(n, seq_len).clone()
    if first_token is not None:
        chunks[:, 0] = first_token
    labels = chunks.clone()
    labels[:, : seq_len // 2 + 1] = -100  # logits from position seq_len // 2 predict labels from + 1 on
    with torch.no_grad():
        losses = [model(c[None], labels=lab[None]).loss.item() for c, lab in zip(chunks, labels)]
    return sum(losses) / n, n * (seq_len - seq_len // 2 - 1)


def test_llama_cpp_protocol_scores_the_second_half(model, tokenizer, text):
    result = perplexity(model, tokenizer, text, seq_len=64, max_tokens=1000, batch_size=4, progress=False,
                        protocol="llama_cpp")
    nll, tokens = _second_half_reference(model, encode(tokenizer, text), 64, 1000)
    assert result["tokens"] == tokens == 15 * 31
    assert result["nll"] == pytest.approx(nll, rel=1e-4)


def test_llama_cpp_protocol_puts_bos_first(model, tokenizer, text):
    """A tokenizer that adds BOS: the stream starts with it and every window's first token is it."""
    import copy

    with_bos = copy.deepcopy(tokenizer)
    with_bos.bos_token = "[CLS]"  # MiniLM's tokenizer puts [CLS] first whenever it adds special tokens
    bos = with_bos.bos_token_id
    result = perplexity(model, with_bos, text, seq_len=32, max_tokens=320, batch_size=4, progress=False,
                        protocol="llama_cpp")
    ids = torch.cat([torch.tensor([bos]), encode(tokenizer, text)])
    nll, tokens = _second_half_reference(model, ids, 32, 320, first_token=bos)
    assert result["tokens"] == tokens
    assert result["nll"] == pytest.approx(nll, rel=1e-4)
    plain = perplexity(model, tokenizer, text, seq_len=32, max_tokens=320, batch_size=4, progress=False,
                       protocol="llama_cpp")
    assert plain["nll"] != pytest.approx(result["nll"], rel=1e-4)
