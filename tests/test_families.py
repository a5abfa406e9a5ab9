"""Every supported family as a user brings it: a saved folder (tiny random weights, a real tokenizer)
given as `model.source`, pruned with STAT at 0.7 by the ordinary config + pipeline path; and a
model whose blocks have no attention stops the command line with one line and exit code 2."""
from __future__ import annotations

import pytest

from stat_exp.config.cli import compose_config
from stat_exp.pipeline import run_pipeline
from tests.adapter_contract import one_thread  # noqa: F401 (fixture)
from tests.jobs import run_cli
from tests.test_adapters import NotedLlamaAdapter
from tests.tiny import (
    tiny_bert,
    tiny_distilbert,
    tiny_falcon,
    tiny_gemma2,
    tiny_gpt2,
    tiny_gpt_neox,
    tiny_llama,
    tiny_mistral,
    tiny_opt,
    tiny_phi3,
    tiny_qwen2,
    tiny_qwen3,
    tiny_roberta,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DECODERS = {"llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3, "opt": tiny_opt,
            "phi3": tiny_phi3, "gpt_neox": tiny_gpt_neox, "gemma2": tiny_gemma2, "gpt2": tiny_gpt2,
            "falcon": tiny_falcon}
ENCODERS = {"bert": tiny_bert, "roberta": tiny_roberta, "distilbert": tiny_distilbert}
SMALL_RUN = ["pruner=stat", "budget.flops=0.7", "budget.seq_len=32", "calib.num_examples=8", "calib.seq_len=32",
             "calib.batch_size=4", "logger=none", "progress=false", "device=cpu"]
CAUSAL_RUN = ["model=smollm2_135m", "eval=perplexity", "eval.perplexity.seq_len=32", "eval.perplexity.max_tokens=256"]
ENCODER_RUN = ["model=minilm_l6", "eval=embedding", "eval.embedding.benchmarks=[simlex]", "eval.embedding.max_pairs=20",
               "eval.embedding.max_length=32"]  # within the tiny models' positions


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, str]:
    """Short slices of the embedded Wikipedia splits (tokenizing the whole corpora would dominate)."""
    from stat_exp.assets import corpus_path

    folder = tmp_path_factory.mktemp("texts")
    out = {}
    for name in ("wiki_calib", "wiki_eval"):
        out[name] = str(folder / f"{name}.txt")
        (folder / f"{name}.txt").write_text(corpus_path(name).read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """name -> a saved tiny model with the (MiniLM) tokenizer next to it, built on first use."""
    builders, made = {**DECODERS, **ENCODERS}, {}

    def folder(name: str):
        if name not in made:
            made[name] = tmp_path_factory.mktemp(name)
            builders[name](vocab=len(tokenizer)).save_pretrained(made[name])
            tokenizer.save_pretrained(made[name])
        return made[name]
    return folder


def run(folder, name: str, extra: list[str], run_dir, texts: dict[str, str]):
    overrides = [*(ENCODER_RUN if name in ENCODERS else [*CAUSAL_RUN, f"eval.perplexity.text_file={texts['wiki_eval']}"]),
                 f"calib.source={texts['wiki_calib']}", f"model.source={folder}", f"model.name={name}", *SMALL_RUN, *extra]
    return run_pipeline(compose_config(overrides), run_dir)


@pytest.mark.parametrize("name", [*DECODERS, *ENCODERS])
def test_stat_at_0_7_from_a_folder(name, folders, texts, tmp_path):
    record = run(folders(name), name, [], tmp_path, texts)
    assert record.status == "ok" and record.model == name
    assert abs(record.achieved["flops_fraction"] - 0.7) <= 0.01
    assert min(record.structure["neurons"]) > 0 and record.metrics


def test_adapter_from_the_config(folders, texts, tmp_path):
    NotedLlamaAdapter.made.clear()
    record = run(folders("llama"), "llama", [f"model.adapter._target_={NotedLlamaAdapter.__module__}.NotedLlamaAdapter",
                                             "+model.adapter.note=from the config"], tmp_path, texts)
    assert record.status == "ok" and set(NotedLlamaAdapter.made) == {"from the config"}


def test_a_model_without_attention_is_one_line_and_exit_2(tmp_path, tokenizer, texts):
    from transformers import MambaConfig, MambaForCausalLM

    MambaForCausalLM(MambaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, state_size=4)
                     ).save_pretrained(tmp_path / "mamba")
    tokenizer.save_pretrained(tmp_path / "mamba")
    out = run_cli([*CAUSAL_RUN, f"model.source={tmp_path / 'mamba'}", f"calib.source={texts['wiki_calib']}",
                   *SMALL_RUN, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: block MambaBlock: no attention projections found (separate Q/K/V named "
                     "q_proj/query/q_lin/..., or a fused one named qkv_proj/c_attn/Wqkv/W_pack/query_key_value)"]


def test_disk_offload_refuses_conv1d_checkpoints_in_one_line(folders, tmp_path):
    """offload=disk reads block weights by name: GPT-2's stored-transposed Conv1D would load wrong."""
    import torch

    from stat_exp.execution.offload import OffloadError, open_model

    with pytest.raises(OffloadError, match="^offload=disk reads block weights by name, and Conv1D checkpoints"):
        open_model(str(folders("gpt2")), "causal_lm", "float32", torch.device("cpu"), "disk", tmp_path)
