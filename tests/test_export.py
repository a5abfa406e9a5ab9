"""Pruned models as ordinary checkpoints: from_pretrained gives the in-memory model back (per-layer
shapes, dtype, tokenizer, task head), generation through the KV cache works, iterative pruning
reports fractions against the dense model, bad folders fail in one line, and speed is measured."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from stat_exp.config.cli import compose_config
from stat_exp.config.validate import checked_config
from stat_exp.data.text import load_text
from stat_exp.errors import ConfigError
from stat_exp.eval.latency import LatencyEval
from stat_exp.eval.tasks import prepare_tasks
from stat_exp.export import load_pruned, save_pruned
from stat_exp.export.save import MODELING_FILE
from stat_exp.factorize import GramBackend
from stat_exp.models import get_adapter
from stat_exp.models.checkpoint import CheckpointError, load_model
from stat_exp.pipeline import run_pipeline
from stat_exp.prune.budget import BudgetSpec, LayerPlan
from stat_exp.prune.runner import PruneRunner
from stat_exp.prune.stat import StatPruner
from tests.jobs import ENV, run_cli
from tests.tiny import VOCAB, batches, tiny_bert, tiny_llama, tiny_opt, tiny_tokenizer

CPU = torch.device("cpu")


def stat_runner(flops: float, allocation: str = "global", gqa: str = "per_group") -> PruneRunner:
    return PruneRunner(StatPruner(gqa=gqa), BudgetSpec(flops, 32, allocation), GramBackend("cpu", "float64"),
                       progress=False)


def stat_pruned(model, flops: float = 0.6, allocation: str = "global", gqa: str = "per_group"):
    stat_runner(flops, allocation, gqa).run(model, get_adapter(model), batches(), CPU)
    return model


def gqa_pruned(gqa: str):
    """A tiny GQA Llama whose two layers keep different query and KV head counts: STAT with explicit
    plans, the smallest attention level and 40 neurons in layer 0, everything but 28 neurons in layer 1."""
    model = tiny_llama(heads=8, kv_heads=4)
    runner, adapter = stat_runner(0.5, gqa=gqa), get_adapter(model)
    scored = runner.score_layers(model, adapter, batches(), CPU)
    runner.apply_plans(adapter, scored, [LayerPlan(0, 40), LayerPlan(len(scored[1][0].attn_levels) - 1, 100)])
    structure = adapter.structure()
    assert structure["heads"][0] < structure["heads"][1] == 8
    if gqa == "whole_groups":
        assert structure["kv_heads"][0] < 4
    return model


def assert_same_logits(loaded, model, batch=None):
    batch = batch or batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gqa", ["per_group", "whole_groups"])
def test_gqa_llama_reloads_with_from_pretrained_and_remote_code(tmp_path, gqa):
    model = gqa_pruned(gqa)
    save_pruned(model, tiny_tokenizer(), tmp_path / "model", "causal_lm")
    assert (tmp_path / "model" / MODELING_FILE).exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert get_adapter(loaded).structure() == get_adapter(model).structure()
    assert_same_logits(loaded, model)


def test_layers_that_differ_need_remote_code(tmp_path):
    save_pruned(gqa_pruned("per_group"), tiny_tokenizer(), tmp_path / "model", "causal_lm")
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "model")


def test_uniform_layers_save_a_stock_config(tmp_path):
    model = stat_pruned(tiny_llama(), 0.6, "uniform")
    structure = get_adapter(model).structure()
    save_pruned(model, tiny_tokenizer(), tmp_path / "model", "causal_lm")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert not (tmp_path / "model" / MODELING_FILE).exists() and "auto_map" not in config
    assert (config["num_attention_heads"], config["intermediate_size"]) == (structure["heads"][0], structure["neurons"][0])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert type(loaded).__module__.startswith("transformers.models.llama")
    assert_same_logits(loaded, model)


def test_opt_with_uniformly_cut_heads_keeps_the_modeling_file(tmp_path):
    """OPT derives head_dim from the head count: a stock config cannot express fewer heads."""
    model = stat_pruned(tiny_opt(), 0.6, "uniform")
    assert len(set(get_adapter(model).structure()["heads"])) == 1
    save_pruned(model, tiny_tokenizer(), tmp_path / "model", "causal_lm")
    assert (tmp_path / "model" / MODELING_FILE).exists()
    assert_same_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True), model)


def test_bert_classifier_reloads_with_its_head_and_as_a_bare_encoder(tmp_path):
    model = stat_pruned(tiny_bert(), 0.6)
    save_pruned(model, tiny_tokenizer(), tmp_path / "model", "sequence_classification")
    assert_same_logits(AutoModelForSequenceClassification.from_pretrained(tmp_path / "model", trust_remote_code=True), model)
    assert_same_logits(load_pruned(tmp_path / "model"), model)
    encoder = AutoModel.from_pretrained(tmp_path / "model", trust_remote_code=True)
    batch = batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(encoder(**batch).last_hidden_state, model.bert(**batch).last_hidden_state)


def test_dtype_and_tokenizer_round_trip(tmp_path):
    model = stat_pruned(tiny_llama()).to(torch.bfloat16)
    tokenizer = tiny_tokenizer()
    save_pruned(model, tokenizer, tmp_path / "model", "causal_lm")
    for loaded in (load_pruned(tmp_path / "model"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True)):
        assert loaded.dtype == torch.bfloat16
        state = model.state_dict()
        assert all(torch.equal(tensor, state[name]) for name, tensor in loaded.state_dict().items())
    text = "t5 t17 t3 t96"
    assert AutoTokenizer.from_pretrained(tmp_path / "model")(text)["input_ids"] == tokenizer(text)["input_ids"]


@pytest.mark.parametrize("gqa", ["per_group", "whole_groups"])
def test_greedy_generation_through_the_kv_cache_after_reload(tmp_path, gqa):
    model = gqa_pruned(gqa)
    save_pruned(model, tiny_tokenizer(), tmp_path / "model", "causal_lm")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True)
    prompt = batches(1, seed=4)[0]["input_ids"][:2, :6]
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = loaded.generate(prompt, use_cache=True, **settings)
    assert torch.equal(cached, loaded.generate(prompt, use_cache=False, **settings))
    assert torch.equal(cached, model.generate(prompt, use_cache=True, **settings))


# ----------------------------------------------------------------------------- jobs on a saved folder


@pytest.fixture
def dense_folder(tmp_path) -> Path:
    """A tiny dense Llama with GQA saved as a plain folder, the tokenizer whose words are its ids."""
    path = tmp_path / "dense"
    tiny_llama(heads=8, kv_heads=4).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"t{i}" for i in torch.randint(1, VOCAB, (3000,), generator=g).tolist()))
    return path


def job(source: Path, run_dir: Path, text: Path, *overrides: str):
    cfg = compose_config([f"model.source={source}", "model.name=tiny", f"calib.source={text}", "calib.num_examples=16",
                          "calib.seq_len=32", "budget.seq_len=32", f"eval.perplexity.text_file={text}",
                          "eval.perplexity.seq_len=32", "eval.perplexity.max_tokens=1024", "logger=none", "progress=false",
                          "device=cpu", *overrides])
    return run_pipeline(cfg, run_dir)


def test_iterative_pruning_composes_the_flops_fraction(tmp_path, dense_folder, text_file):
    first = job(dense_folder, tmp_path / "a", text_file, "pruner=stat", "budget.flops=0.7", "save_model=true")
    assert first.achieved["flops_fraction"] == pytest.approx(0.7, abs=0.01)
    assert "flops_fraction_of_input" not in first.achieved
    again = job(tmp_path / "a" / "model", tmp_path / "b", text_file, "pruner=stat", "budget.flops=0.7",
                "save_model=true")
    assert again.achieved["flops_fraction_of_input"] == pytest.approx(0.7, abs=0.01)
    assert again.achieved["flops_fraction"] == pytest.approx(first.achieved["flops_fraction"] * 0.7, abs=0.015)
    assert again.achieved["params_fraction"] < first.achieved["params_fraction"]
    evaluated = job(tmp_path / "b" / "model", tmp_path / "c", text_file, "pruner=none")
    assert evaluated.achieved["flops_fraction"] == pytest.approx(again.achieved["flops_fraction"])
    assert evaluated.metrics["perplexity/ppl"] == pytest.approx(again.metrics["perplexity/ppl"], rel=1e-5)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_a_saved_pruned_folder_evaluates_the_same_with_offloaded_blocks(tmp_path, text_file, saved, offload):
    kept = job(saved, tmp_path / "none", text_file, "pruner=none", "execution.offload=none")
    offloaded = job(saved, tmp_path / offload, text_file, "pruner=none", f"execution.offload={offload}")
    assert offloaded.metrics["perplexity/ppl"] == pytest.approx(kept.metrics["perplexity/ppl"], rel=1e-6)
    recorded = json.loads((saved / "config.json").read_text())["stat_exp_pruning"]["structure"]
    assert offloaded.structure == kept.structure == recorded


def test_greedy_generation_of_a_budget_one_job_equals_the_dense_model(tmp_path, dense_folder, text_file):
    job(dense_folder, tmp_path / "run", text_file, "pruner=stat", "budget.flops=1.0", "save_model=true")
    prompt = batches(1, seed=4)[0]["input_ids"][:2, :6]
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    dense = AutoModelForCausalLM.from_pretrained(dense_folder).generate(prompt, **settings)
    assert torch.equal(load_pruned(tmp_path / "run" / "model").generate(prompt, **settings), dense)


def test_several_evaluators_run_on_one_pruned_model(tmp_path, dense_folder, text_file, monkeypatch):
    pruned = []
    original = PruneRunner.run
    monkeypatch.setattr(PruneRunner, "run", lambda self, *a, **k: pruned.append(1) or original(self, *a, **k))
    record = job(dense_folder, tmp_path / "run", text_file, "pruner=stat", "budget.flops=0.7",
                 "eval=[perplexity,latency]", "eval.latency.seq_len=16", "eval.latency.decode_tokens=2",
                 "eval.latency.repeats=2")
    assert len(pruned) == 1
    assert {"perplexity/ppl", "latency/prefill_tokens_per_s", "latency/decode_ms_per_token"} <= set(record.metrics)


def test_an_interrupted_save_leaves_no_folder_that_looks_complete(tmp_path, monkeypatch):
    first, second = stat_pruned(tiny_llama()), stat_pruned(tiny_llama(), 0.5)
    save_pruned(first, tiny_tokenizer(), tmp_path / "kept", "causal_lm")
    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(type(tokenizer), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    for name in ("new", "kept"):
        with pytest.raises(KeyboardInterrupt):
            save_pruned(second, tokenizer, tmp_path / name, "causal_lm")
    assert not (tmp_path / "new").exists()
    assert_same_logits(load_pruned(tmp_path / "kept"), first)  # the folder it was replacing, whole


# ----------------------------------------------------------------------------- bad folders


@pytest.fixture
def saved(tmp_path) -> Path:
    return save_pruned(gqa_pruned("per_group"), tiny_tokenizer(), tmp_path / "model", "causal_lm")


def _shrink_first_recorded_parameter(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    shapes = config["stat_exp_pruning"]["parameters"]
    name = next(n for n in shapes if n.endswith("mlp.up_proj.weight"))
    shapes[name][0] -= 1
    (path / "config.json").write_text(json.dumps(config))


def _truncate_weights(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize("damage,message", [
    (lambda p: (p / "config.json").unlink(), "not a model folder (no config.json)"),
    (_shrink_first_recorded_parameter, "structure contradicts the weights: layers.0.mlp.up_proj.weight"),
    (_truncate_weights, "model.safetensors is truncated or corrupt"),
])
def test_bad_folders_fail_in_one_line_naming_the_folder(saved, damage, message):
    damage(saved)
    for load in (lambda: load_pruned(saved), lambda: load_model(str(saved))):
        with pytest.raises(CheckpointError) as err:
            load()
        assert str(saved) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_a_plain_folder_whose_config_contradicts_its_weights_fails_before_loading(dense_folder):
    config = json.loads((dense_folder / "config.json").read_text())
    (dense_folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"contradicts the weights: layers.0.mlp.down_proj.weight is \[64, 128\]"):
        load_model(str(dense_folder))


# ----------------------------------------------------------------------------- latency


@pytest.mark.parametrize("build,keys", [
    (tiny_llama, {"prefill_tokens_per_s", "prefill_tokens_per_s_iqr", "decode_ms_per_token", "decode_ms_per_token_iqr"}),
    (tiny_bert, {"prefill_tokens_per_s", "prefill_tokens_per_s_iqr"}),
])
def test_latency_reports_positive_finite_speeds(build, keys):
    metrics = LatencyEval(batch_size=2, seq_len=16, decode_tokens=3, warmup=1, repeats=3)(build(), None, CPU)
    assert set(metrics) == {f"latency/{k}" for k in keys}
    assert all(math.isfinite(v) and v >= 0 for v in metrics.values())
    assert all(v > 0 for k, v in metrics.items() if not k.endswith("_iqr"))


def test_latency_times_the_model_runs(monkeypatch):
    """Every model call sleeps 10 ms, so the timed runs take at least that: prefill at most
    tokens / 10 ms per second, decode at least 10 ms per token (an evaluator timing nothing, or
    timing outside the model calls, reports impossible speeds)."""
    import time

    model = tiny_llama()
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.01))
    metrics = LatencyEval(batch_size=2, seq_len=16, decode_tokens=3, warmup=0, repeats=2)(model, None, CPU)
    assert 0 < metrics["latency/prefill_tokens_per_s"] <= 2 * 16 / 0.01
    assert metrics["latency/decode_ms_per_token"] >= 10


def test_latency_settings_are_checked_before_anything_loads():
    with pytest.raises(ConfigError, match=r"^eval.latency.repeats=0; must be greater than 0"):
        checked_config(compose_config(["eval=latency", "eval.latency.repeats=0"]))


# ----------------------------------------------------------------------------- the ecosystem, end to end


@pytest.mark.e2e
def test_lm_eval_command_line_runs_offline_on_a_saved_pruned_model(saved, tmp_path):
    """The command README shows, with the package's offline tasks (--include_path)."""
    include_path = prepare_tasks(["stat_pang_lee"])
    proc = subprocess.run([str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
                           f"pretrained={saved},trust_remote_code=True", "--tasks", "stat_pang_lee", "--include_path",
                           str(include_path), "--limit", "2", "--device", "cpu", "--batch_size", "2"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stat_pang_lee" in proc.stdout and "acc" in proc.stdout


@pytest.mark.e2e
def test_a_saved_smollm2_evaluates_the_same_in_a_second_job(tmp_path):
    """Job 1 prunes the embedded SmolLM2 (FLAP: per-layer counts and created biases) and saves it;
    job 2 evaluates the folder through model.source with pruner=none."""
    text = tmp_path / "eval.txt"
    text.write_text(load_text("wiki_eval")[:20_000])
    common = ["eval=perplexity", f"eval.perplexity.text_file={text}", "eval.perplexity.max_tokens=1024", "logger=none"]
    first = run_cli(["pruner=flap", "budget.flops=0.7", "calib.num_examples=8", "calib.seq_len=128", *common,
                  "save_model=true", f"hydra.run.dir={tmp_path / 'a'}"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "a" / "model" / MODELING_FILE).exists()
    second = run_cli([f"model.source={tmp_path / 'a' / 'model'}", "pruner=none", *common,
                   f"hydra.run.dir={tmp_path / 'b'}"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert b["metrics"]["perplexity/ppl"] == pytest.approx(a["metrics"]["perplexity/ppl"], rel=1e-3)
    assert b["achieved"]["flops_fraction"] == pytest.approx(a["achieved"]["flops_fraction"])
    assert b["structure"] == a["structure"]


def test_the_exports_output_check_tells_models_apart():
    """`expresses` trusts the output comparison for attributes pruning may leave stale: a twin whose
    code computes something else (another activation) must compare unequal, the same config equal."""
    import copy

    from stat_exp.export.record import _same_outputs, stock_model

    model = tiny_llama()
    assert _same_outputs(model, stock_model(model, copy.deepcopy(model.config)))
    other = copy.deepcopy(model.config)
    other.hidden_act = "relu"
    assert not _same_outputs(model, stock_model(model, other))
