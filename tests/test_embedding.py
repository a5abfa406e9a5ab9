"""Embedding benchmarks on the embedded MiniLM encoder, and the fine-tuning path on a tiny model."""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

import stat_exp.finetune.classifier as finetune_module
from stat_exp.config.signature import check_node
from stat_exp.errors import ConfigError, UserError
from stat_exp.eval.embedding import EmbeddingEval, embed
from stat_exp.finetune.classifier import INFO_FILE, Recipe, ensure_polarity_model, finetune
from stat_exp.models.loading import load_model, resolve_source

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm_l6", "encoder")


def test_suite_on_minilm_gives_finite_correlations(minilm):
    metrics = EmbeddingEval(max_pairs=150, max_docs=30, folds=3)(*minilm, CPU)
    assert set(metrics) == {"embedding/lee_spearman", "embedding/lee_pearson", "embedding/simlex_spearman",
                            "embedding/polarity_acc"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["embedding/lee_spearman"] > 0.4  # dense MiniLM: 0.68 on these 30 documents, 0.51 on all 50
    assert metrics["embedding/simlex_spearman"] > 0.2
    assert metrics["embedding/polarity_acc"] > 0.6


def test_mean_pooling_ignores_padding(minilm):
    model, tokenizer = minilm
    alone = embed(model, tokenizer, ["short ."], CPU)
    batched = embed(model, tokenizer, ["short .", "a much longer sentence that forces padding on the first one ."], CPU)
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-5)


def test_unknown_benchmark_is_rejected():
    with pytest.raises(ConfigError, match=r"eval.embedding.benchmarks\[1\]='sts'; allowed: lee, simlex, polarity"):
        check_node("eval.embedding", {"_target_": "stat_exp.eval.embedding.EmbeddingEval", "benchmarks": ["lee", "sts"]})


@pytest.fixture
def tiny_encoder(tmp_path, tokenizer):
    """A tiny random BERT encoder folder with the MiniLM tokenizer."""
    folder = tmp_path / "tiny-bert"
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_finetune_writes_a_loadable_classifier(tmp_path, tiny_encoder):
    out = tmp_path / "tiny-polarity"
    recipe = Recipe(model=str(tiny_encoder), epochs=1, batch_size=50)
    metrics = finetune(recipe, out, progress=False)
    assert 0 <= metrics["glue/accuracy"] <= 1
    assert json.loads((out / INFO_FILE).read_text())["metrics"] == metrics
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 2 and model.config.id2label[1] == "positive"
    with pytest.raises(UserError, match="exists"):
        finetune(recipe, out, progress=False)


def test_ensure_polarity_model_prepares_once(tmp_path, tiny_encoder, monkeypatch):
    monkeypatch.setenv("STAT_EXP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(finetune_module, "Recipe", functools.partial(Recipe, model=str(tiny_encoder), epochs=1))
    path = ensure_polarity_model(progress=False)
    assert path == tmp_path / "cache" / "models" / "minilm_l6_polarity" and (path / "config.json").is_file()
    stamp = (path / INFO_FILE).stat().st_mtime_ns
    assert ensure_polarity_model(progress=False) == path and (path / INFO_FILE).stat().st_mtime_ns == stamp
    assert resolve_source("minilm_l6_polarity") == str(path)  # model=minilm_l6_polarity loads this folder
    assert not list(path.parent.glob(".*tmp*"))
