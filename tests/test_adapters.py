"""Every supported family through the adapter contract (tests/adapter_contract.py), plus what is
particular to discovery: it agrees with the explicit adapters, finds post-norms only where they
are, keeps GPT-2 checkpoints stock, names what it cannot find, and user adapters plug in."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from stat_exp.errors import ConfigError
from stat_exp.models import ADAPTERS, DiscoveredAdapter, UnsupportedModelError, adapter_from_config, get_adapter
from stat_exp.models.bookkeeping import LayerConfig
from stat_exp.models.conv1d import TransposedLinear
from stat_exp.models.decoders import LlamaAdapter
from stat_exp.models.discovery import plan_block
from tests.adapter_contract import AdapterContract, one_thread, output, stat  # noqa: F401 (fixture)
from tests.tiny import (
    batches,
    clone,
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


class TestLlama(AdapterContract):
    def build(self):
        return tiny_llama(heads=8, kv_heads=2)


class TestMistral(AdapterContract):  # multi-query: one KV head
    def build(self):
        return tiny_mistral()


class TestQwen2(AdapterContract):  # biases on Q/K/V
    def build(self):
        return tiny_qwen2()


class TestQwen3(AdapterContract):  # per-head q/k norms
    def build(self):
        return tiny_qwen3()


class TestOPT(AdapterContract):
    def build(self):
        return tiny_opt()


class TestPhi3(AdapterContract):  # fused qkv_proj and gate_up_proj; forward reads config.num_attention_heads
    def build(self):
        return tiny_phi3()


class TestGPTNeoX(AdapterContract):  # query_key_value interleaved per head, parallel blocks
    def build(self):
        return tiny_gpt_neox()


class TestGemma2(AdapterContract):  # sliding + global layers, post-norms, head_dim 16 != 32 / 4
    def build(self):
        return tiny_gemma2()


class TestGPT2(AdapterContract):  # Conv1D, fused c_attn
    def build(self):
        return tiny_gpt2()


class TestFalcon(AdapterContract):  # new architecture: query_key_value grouped per KV head
    def build(self):
        return tiny_falcon()


class TestFalconMultiQuery(AdapterContract):  # [q heads | k | v]
    def build(self):
        return tiny_falcon(new_architecture=False, multi_query=True)


class TestFalconMultiHead(AdapterContract):  # [q, k, v] interleaved per head
    def build(self):
        return tiny_falcon(kv_heads=4, new_architecture=False, multi_query=False)


class TestBert(AdapterContract):
    task = "sequence_classification"

    def build(self):
        return tiny_bert()


class TestRoberta(AdapterContract):
    task = "encoder"

    def build(self):
        return tiny_roberta()


class TestDistilBert(AdapterContract):
    task = "encoder"

    def build(self):
        return tiny_distilbert()


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt, tiny_bert, tiny_distilbert],
                         ids=["llama", "opt", "bert", "distilbert"])
def test_discovery_finds_what_the_explicit_adapters_declare(build):
    """Where an explicit adapter exists, discovery on the same model finds the same modules."""
    model = build()
    explicit, found = get_adapter(model), DiscoveredAdapter(model)
    assert type(explicit) in ADAPTERS and explicit.causal == found.causal
    for layer in explicit.layers():
        a, b = explicit.attention(layer), found.attention(layer)
        assert [a.module, a.q, a.k, a.v, a.o, a.num_heads, a.num_kv_heads, a.head_dim] == [
            b.module, b.q, b.k, b.v, b.o, b.num_heads, b.num_kv_heads, b.head_dim]
        assert explicit.ffn(layer).projections == found.ffn(layer).projections
    assert [id(x) for x in explicit.layers()] == [id(x) for x in found.layers()]


def test_post_norms_are_the_norms_of_the_outputs_before_the_residual_add():
    gemma = get_adapter(tiny_gemma2())
    for layer in gemma.layers():
        assert gemma.attention(layer).post_norm is layer.post_attention_layernorm
        assert gemma.ffn(layer).post_norm is layer.post_feedforward_layernorm
    assert gemma.attention(gemma.layers()[0]).head_dim == 16 != gemma.hidden_size // 4
    assert set(gemma.config.layer_types) == {"sliding_attention", "full_attention"}
    # Llama names its pre-FFN norm post_attention_layernorm: it normalises the residual stream, not
    # the attention output, so it is no post-norm (a name-based guess would get this wrong)
    llama = DiscoveredAdapter(tiny_llama())
    assert all(llama.attention(l).post_norm is None and llama.ffn(l).post_norm is None for l in llama.layers())


def test_fused_projections_count_like_separate_ones():
    adapter = get_adapter(tiny_phi3())
    attn, ffn = adapter.attention(adapter.layers()[0]), adapter.ffn(adapter.layers()[0])
    assert attn.projections == [attn.qkv, attn.o] and attn.qkv.out_features == (4 + 2 * 2) * attn.head_dim
    assert ffn.gate_up is not None and ffn.matrices == 3 and ffn.width == 64


def test_phi3_layers_get_their_own_head_counts():
    """Phi-3 reads config.num_attention_heads in its forward: each pruned layer gets a config view."""
    model = tiny_phi3(layers=3)
    stat(model, 0.5)
    adapter = get_adapter(model)
    for layer in adapter.layers():
        config = layer.self_attn.config
        assert isinstance(config, LayerConfig) and config.shared is model.config
        assert config.num_attention_heads == adapter.attention(layer).num_heads
    assert model.config.num_attention_heads == 4
    model.set_attn_implementation("eager")  # read live through the views
    assert {layer.self_attn.config._attn_implementation for layer in adapter.layers()} == {"eager"}


def test_gpt2_checkpoints_keep_the_stock_conv1d_layout(tmp_path):
    from transformers import GPT2LMHeadModel

    model = tiny_gpt2()
    adapter = get_adapter(model)
    assert isinstance(adapter.attention(adapter.layers()[0]).qkv, TransposedLinear)
    x = batches(1)[0]
    model.save_pretrained(tmp_path)
    stock = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert type(stock.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(output(stock, x), output(model, x))


def test_a_block_without_attention_is_named_in_one_line():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=97, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(UnsupportedModelError, match=r"^block MambaBlock: no attention projections found") as e:
        get_adapter(model)
    assert "\n" not in str(e.value)


def test_a_block_without_ffn_is_named_in_one_line():
    block = nn.Module()
    block.self_attn = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(block.self_attn, name, nn.Linear(8, 8))
    block.mlp = nn.Module()
    block.mlp.w_in, block.mlp.w_out = nn.Linear(8, 16), nn.Linear(16, 8)
    with pytest.raises(UnsupportedModelError, match=r"^block Module: no feed-forward projections found"):
        plan_block(block)


def test_alibi_and_encoder_decoder_models_are_refused():
    from transformers import BloomConfig, BloomForCausalLM, T5Config, T5ForConditionalGeneration

    with pytest.raises(UnsupportedModelError, match="'bloom' uses ALiBi"):
        get_adapter(BloomForCausalLM(BloomConfig(vocab_size=97, hidden_size=16, n_layer=1, n_head=2)))
    with pytest.raises(UnsupportedModelError, match="'t5' is an encoder-decoder"):
        get_adapter(T5ForConditionalGeneration(T5Config(vocab_size=97, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                        d_kv=8)))


class NotedLlamaAdapter(LlamaAdapter):
    """A user adapter, plugged in from a config: records its option and its instances."""

    made: list[str] = []

    def __init__(self, model: nn.Module, note: str = ""):
        super().__init__(model)
        self.made.append(note)


def test_adapter_from_config_is_used_for_the_model_from_then_on(tmp_path, tokenizer):
    factory = adapter_from_config(OmegaConf.create({"_target_": f"{__name__}.NotedLlamaAdapter", "note": "mine"}))
    model = tiny_llama()
    NotedLlamaAdapter.made.clear()
    assert type(get_adapter(model, factory)) is NotedLlamaAdapter
    fresh = clone(model)
    stat(model, 0.7)  # the runner asks get_adapter(model) again: still the configured adapter
    assert type(get_adapter(model)) is NotedLlamaAdapter and set(NotedLlamaAdapter.made) == {"mine"}
    assert type(get_adapter(fresh)) is LlamaAdapter
    assert adapter_from_config(None) is None and adapter_from_config(OmegaConf.create({"_target_": None})) is None


def test_adapter_config_is_checked_before_anything_loads():
    from stat_exp.config.cli import compose_config
    from stat_exp.config.validate import checked_config

    target = f"model.adapter._target_={__name__}.NotedLlamaAdapter"
    assert checked_config(compose_config([]))["model"]["adapter"]["_target_"] is None
    assert checked_config(compose_config([target, "+model.adapter.note=x"]))["model"]["adapter"]["note"] == "x"
    with pytest.raises(ConfigError, match=r"^model.adapter.colour: unknown key for .*NotedLlamaAdapter"):
        checked_config(compose_config([target, "+model.adapter.colour=red"]))


@pytest.mark.parametrize("cfg,message", [
    ({"_target_": "no_such_module.Adapter"}, r"model.adapter._target_='no_such_module.Adapter' cannot be imported"),
    ({"_target_": "torch.nn.Linear"}, "must name a subclass of stat_exp.models.ModelAdapter"),
    ({"note": "x"}, "must name a subclass"),
])
def test_bad_adapter_config_is_one_line(cfg, message):
    with pytest.raises(ConfigError, match=message) as e:
        adapter_from_config(OmegaConf.create(cfg))
    assert "\n" not in str(e.value)



def test_discovery_reads_shapes_on_the_meta_device():
    """A planner works from the config alone: discovery then reads shapes, and traces post-norms on
    shapes where the model runs there (so offload=disk prices Gemma 2 as offload=none does)."""
    with torch.device("meta"):
        model = tiny_gpt2()  # reads a value in its forward: nothing traced
    adapter = get_adapter(model)
    assert adapter.structure() == {"heads": [4, 4], "kv_heads": [4, 4], "neurons": [64, 64]}
    assert adapter.plan.attn_post_norm is None and adapter.attention(adapter.layers()[0]).qkv.weight.is_meta
    with torch.device("meta"):
        gemma = get_adapter(tiny_gemma2())
    layer = gemma.layers()[0]
    assert gemma.attention(layer).post_norm is layer.post_attention_layernorm
    assert gemma.ffn(layer).post_norm is layer.post_feedforward_layernorm
