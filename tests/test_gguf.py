"""GGUF export, verified in llama.cpp itself: the file loads, and llama-perplexity on the same tokens
and windows equals our perplexity (protocol=llama_cpp) for dense, uniform and per-layer models.

Tests that run llama.cpp need `make llama-cpp` (which `make test` runs); they skip with that reason
when it is not built, except under CI=true, where they run and fail instead.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM)

from stat_exp.assets import model_path
from stat_exp.config.cli import compose_config
from stat_exp.config.validate import checked_config
from stat_exp.data.text import load_text
from stat_exp.eval.gguf import GgufEval
from stat_exp.eval.llama_cpp_tools import llama_perplexity
from stat_exp.errors import ConfigError
from stat_exp.eval.perplexity import perplexity
from stat_exp.export import llama_cpp, save_pruned
from stat_exp.export.gguf import export_gguf, gguf_plan
from stat_exp.export.record import ExportError
from stat_exp.models import get_adapter
from stat_exp.pipeline import run_pipeline
from stat_exp.prune.budget import BudgetError, FlopsModel, allocate
from stat_exp.prune.scores import AttentionLevel
from stat_exp.prune.surgery import prune_attention, prune_ffn
from tests.jobs import ENV, run_cli
from tests.test_budget import SMOLLM2, scores_for
from tests.tiny import tiny_opt, tiny_qwen3

needs_llama_cpp = pytest.mark.skipif(
    not llama_cpp.available() and os.environ.get("CI") != "true",
    reason="llama.cpp is not built: run `make llama-cpp` (make test does; under CI=true these tests fail instead)")

SEQ, MAX_TOKENS = 64, 512  # 8 windows of 64 tokens; llama.cpp scores the last 31 of each
HETEROGENEOUS = {"heads": [2, 8, 4], "kv_heads": [2, 2, 1], "neurons": [40, 128, 77]}
UNIFORM = {"heads": [4, 4, 4], "kv_heads": [2, 2, 2], "neurons": [64, 64, 64]}


@pytest.fixture(scope="module")
def smol_tokenizer():
    """SmolLM2's real BPE tokenizer: llama.cpp's converter recognises its pre-tokenizer (`smollm`)."""
    return AutoTokenizer.from_pretrained(model_path("smollm2_135m"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(load_text("wiki_eval")[:30_000], encoding="utf-8")
    return path


FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}


def tiny_llama(structure: dict[str, list[int]] | None, vocab: int, family: str = "llama") -> LlamaForCausalLM:
    """A random 3-layer Llama-family model with weights large enough (std 0.2) that attention is
    sharp, and FFN outputs scaled down (x0.05) so that attention decides the output: a wrong Q/K row
    order for llama.cpp's RoPE moves its perplexity by ~4% (by <1% without the scaling). Shaped like a
    pruned model by `structure`."""
    torch.manual_seed(0)
    config_class, model_class = FAMILIES[family]
    config = config_class(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=8, initializer_range=0.2,
                          attn_implementation="sdpa", sliding_window=None)
    model = model_class(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(0.05)
    if structure is not None:  # keep the first heads of the first KV groups, and the first neurons
        adapter = get_adapter(model)
        for layer, heads, kv, neurons in zip(adapter.layers(), *structure.values()):
            group = adapter.attention(layer).group_size
            prune_attention(adapter, layer, AttentionLevel(
                tuple(g * group + j for g in range(kv) for j in range(heads // kv)), tuple(range(kv))))
            prune_ffn(adapter, layer, torch.arange(neurons))
    return model


def metadata(path) -> dict:
    """The GGUF's key-value metadata (tokenizer arrays left out), read with the pinned gguf package."""
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if k not in skip}


def our_ppl(model, tokenizer, text_file, seq_len=SEQ, max_tokens=MAX_TOKENS) -> float:
    return perplexity(model, tokenizer, text_file.read_text(), seq_len, max_tokens, 8, progress=False,
                      protocol="llama_cpp")["ppl"]


# ----------------------------------------------------------------------------- what goes where


def test_uniform_layers_get_the_stock_architecture_and_differing_ones_deci():
    uniform = gguf_plan(LlamaConfig(num_hidden_layers=3, head_dim=8, hidden_size=64), UNIFORM)
    assert uniform.kind == "stock"
    assert (uniform.hparams["num_attention_heads"], uniform.hparams["intermediate_size"]) == (4, 64)
    per_layer = gguf_plan(LlamaConfig(num_hidden_layers=3, head_dim=8, hidden_size=64), HETEROGENEOUS)
    assert per_layer.kind == "per_layer" and per_layer.architecture == "deci"
    assert per_layer.hparams["num_key_value_heads"] == HETEROGENEOUS["kv_heads"]
    assert per_layer.hparams["head_dim"] == 8


def test_what_llama_cpp_cannot_express_is_one_line():
    with pytest.raises(ExportError, match="model type 'opt' is not one of them"):
        gguf_plan(tiny_opt().config)
    qwen3 = tiny_qwen3(layers=2)
    with pytest.raises(ExportError, match="no per-layer architecture for 'qwen3'.*budget.allocation=uniform"):
        gguf_plan(qwen3.config, {"heads": [2, 4], "kv_heads": [2, 2], "neurons": [64, 64]})
    with pytest.raises(ExportError, match="layer 1 keeps no FFN neurons"):
        gguf_plan(LlamaConfig(num_hidden_layers=2), {"heads": [2, 4], "kv_heads": [2, 2], "neurons": [64, 0]})


def test_the_budget_keeps_a_head_and_a_neuron_in_every_layer_at_its_floor():
    """llama.cpp cannot run a layer without heads or neurons (see stat_exp.export.gguf): below the cost
    of one head level and one neuron per layer the budget refuses, and at that floor keeps both."""
    shapes, flops = [SMOLLM2] * 3, FlopsModel(256)
    scores = [scores_for(s) for s in shapes]
    smallest = scores[0].attn_levels[0]
    dense = sum(flops.dense(s) for s in shapes)
    floor = sum(flops.attention(s, smallest.num_heads, smallest.num_kv_heads) + flops.ffn(s, 1) for s in shapes)
    half_a_neuron_less = (floor - 0.5 * flops.ffn(SMOLLM2, 1)) / dense
    assert smallest.num_heads >= 1 and smallest.num_kv_heads >= 1
    with pytest.raises(BudgetError, match="smallest reachable fraction"):
        allocate(scores, shapes, flops, half_a_neuron_less, "global")
    plans = allocate(scores, shapes, flops, floor / dense * 1.000001, "global")
    assert min(p.neurons for p in plans) >= 1


def test_the_command_line_refuses_an_unsupported_family_in_one_line(tmp_path):
    tiny_opt().save_pretrained(tmp_path / "opt")
    proc = subprocess.run([sys.executable, "-m", "stat_exp.export.gguf", str(tmp_path / "opt"), "--out",
                           str(tmp_path / "x.gguf")], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: GGUF export supports the Llama-family decoders "
                                                "llama, mistral, qwen2, qwen3; model type 'opt' is not one of them"]
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_settings_are_checked_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"^eval.gguf.outtype='q3'; allowed: f32, f16, q8_0, q4_0, q4_k_m"):
        checked_config(compose_config(["eval=gguf", "eval.gguf.outtype=q3"]))
    with pytest.raises(ConfigError, match=r"^save_gguf='f8'; allowed: f32, f16"):
        checked_config(compose_config(["save_gguf=f8"]))
    with pytest.raises(ConfigError, match=r"^save_gguf=f16 needs save_model=true"):
        run_pipeline(compose_config(["save_gguf=f16", "logger=none"]), tmp_path)


# ----------------------------------------------------------------------------- llama.cpp runs them


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_a_per_layer_llama_loads_in_llama_cpp_with_our_perplexity(tmp_path, smol_tokenizer, text_file, outtype):
    model = tiny_llama(HETEROGENEOUS, len(smol_tokenizer))
    folder = save_pruned(model, smol_tokenizer, tmp_path / "model", "causal_lm")
    out = export_gguf(folder, tmp_path / f"model-{outtype}.gguf", outtype)
    meta = metadata(out)
    assert meta["general.architecture"] == "deci"
    assert meta["deci.attention.head_count"] == HETEROGENEOUS["heads"]
    assert meta["deci.attention.head_count_kv"] == HETEROGENEOUS["kv_heads"]
    assert meta["deci.feed_forward_length"] == HETEROGENEOUS["neurons"]
    ours = our_ppl(model, smol_tokenizer, text_file)
    theirs = llama_perplexity(out, text_file, SEQ, MAX_TOKENS // SEQ)
    assert theirs == pytest.approx(ours, rel=0.01)


@needs_llama_cpp
def test_a_uniform_pruned_llama_goes_through_the_stock_architecture(tmp_path, smol_tokenizer, text_file):
    model = tiny_llama(UNIFORM, len(smol_tokenizer))
    folder = save_pruned(model, smol_tokenizer, tmp_path / "model", "causal_lm")
    out = export_gguf(folder, tmp_path / "model.gguf", "f32")
    meta = metadata(out)
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.attention.head_count"], meta["llama.feed_forward_length"]) == (4, 64)
    assert llama_perplexity(out, text_file, SEQ, MAX_TOKENS // SEQ) == pytest.approx(
        our_ppl(model, smol_tokenizer, text_file), rel=0.01)


@needs_llama_cpp
@pytest.mark.parametrize("structure,architecture", [(HETEROGENEOUS, "deci"), (UNIFORM, "llama")])
def test_mistral_loads_in_llama_cpp_with_our_perplexity(tmp_path, smol_tokenizer, text_file, structure, architecture):
    """Mistral per layer (deci) and uniform (llama.cpp reads it as `llama`). Qwen2 is not checked
    here: transformers loads any tokenizer saved beside a Qwen2 config as Qwen2's, whose
    pre-tokenizer llama.cpp's converter does not recognise in SmolLM2's vocabulary, and no Qwen2
    tokenizer ships offline."""
    model = tiny_llama(structure, len(smol_tokenizer), "mistral")
    folder = save_pruned(model, smol_tokenizer, tmp_path / "model", "causal_lm")
    out = export_gguf(folder, tmp_path / "model.gguf", "f32")
    assert metadata(out)["general.architecture"] == architecture
    assert llama_perplexity(out, text_file, SEQ, MAX_TOKENS // SEQ) == pytest.approx(
        our_ppl(model, smol_tokenizer, text_file), rel=0.01)


@needs_llama_cpp
def test_the_gguf_evaluator_records_engine_perplexity_and_speed(smol_tokenizer, text_file):
    model = tiny_llama(HETEROGENEOUS, len(smol_tokenizer))
    metrics = GgufEval(outtype="f32", text_file=str(text_file), seq_len=SEQ, max_tokens=MAX_TOKENS, prompt_tokens=16,
                       gen_tokens=4, repeats=1, progress=False)(model, smol_tokenizer, torch.device("cpu"))
    assert {"gguf/ppl", "gguf/torch_ppl", "gguf/prefill_tokens_per_s", "gguf/decode_tokens_per_s",
            "gguf/file_mb"} <= set(metrics)
    assert metrics["gguf/ppl"] == pytest.approx(metrics["gguf/torch_ppl"], rel=0.01)
    assert metrics["gguf/torch_ppl"] == pytest.approx(our_ppl(model, smol_tokenizer, text_file), rel=1e-6)
    assert metrics["gguf/prefill_tokens_per_s"] > 0 and metrics["gguf/decode_tokens_per_s"] > 0


# ----------------------------------------------------------------------------- the real model, end to end


@pytest.mark.e2e
@needs_llama_cpp
def test_dense_smollm2_matches_llama_cpp(tmp_path, smol_tokenizer, text_file):
    folder = model_path("smollm2_135m")
    out = export_gguf(folder, tmp_path / "dense.gguf", "f16")
    assert metadata(out)["general.architecture"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = our_ppl(model, smol_tokenizer, text_file, 256, 1024)
    assert llama_perplexity(out, text_file, 256, 4) == pytest.approx(ours, rel=0.01)


@pytest.mark.e2e
@needs_llama_cpp
def test_a_stat_global_smollm2_job_runs_in_llama_cpp_as_in_pytorch(tmp_path, text_file):
    """One job: STAT with the global allocation at 0.7 of the FLOPs (small calibration), eval=[perplexity,
    gguf] on llama.cpp's protocol, saved with a Q8_0 GGUF beside model/."""
    run = tmp_path / "run"
    text = ["eval=[perplexity,gguf]", f"eval.perplexity.text_file={text_file}", "eval.perplexity.seq_len=256",
            "eval.perplexity.max_tokens=1024", "eval.perplexity.protocol=llama_cpp", f"eval.gguf.text_file={text_file}",
            "eval.gguf.seq_len=256", "eval.gguf.max_tokens=1024", "eval.gguf.prompt_tokens=32", "eval.gguf.gen_tokens=8",
            "eval.gguf.repeats=1"]
    proc = run_cli(["pruner=stat", "budget.flops=0.7", "calib.num_examples=32", "calib.seq_len=256", *text,
                    "logger=none", "progress=false", "save_model=true", "save_gguf=q8_0", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run / "results.json").read_text())
    structure, metrics = record["structure"], record["metrics"]
    assert len(set(structure["neurons"])) > 1  # the global allocation: layers differ
    assert metrics["gguf/ppl"] == pytest.approx(metrics["perplexity/ppl"], rel=0.01)  # f16 in llama.cpp vs PyTorch
    q8 = run / "model-q8_0.gguf"
    meta = metadata(q8)
    assert meta["general.architecture"] == "deci" and meta["deci.feed_forward_length"] == structure["neurons"]
    assert llama_perplexity(q8, text_file, 256, 4) == pytest.approx(metrics["gguf/ppl"], rel=0.02)
    assert np.isfinite(metrics["gguf/decode_tokens_per_s"])
