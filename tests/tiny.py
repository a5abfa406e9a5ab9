"""Tiny randomly initialised models and calibration batches, built in-process for fast tests."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertModel,
    FalconConfig,
    FalconForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaModel,
)

from stat_exp.factorize.gram import GramBackend
from stat_exp.models import get_adapter
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.base import Pruner
from stat_exp.prune.runner import PruneOutcome, PruneRunner

VOCAB = 97


def tiny_llama(heads: int = 8, kv_heads: int = 2, layers: int = 2, hidden: int = 64, ffn: int = 128,
               bias: bool = False, vocab: int = VOCAB) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                      attention_bias=bias, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(heads: int = 4, kv_heads: int = 2, layers: int = 2, hidden: int = 32, ffn: int = 96, vocab: int = VOCAB) -> Qwen2ForCausalLM:
    """Qwen2: grouped-query attention with biases on Q/K/V."""
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).eval()


def tiny_mistral(heads: int = 4, kv_heads: int = 1, layers: int = 2, hidden: int = 32, ffn: int = 96, vocab: int = VOCAB) -> MistralForCausalLM:
    cfg = MistralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                        sliding_window=None, attn_implementation="sdpa")
    return MistralForCausalLM(cfg).eval()


def tiny_opt(heads: int = 4, layers: int = 2, hidden: int = 32, ffn: int = 128, vocab: int = VOCAB) -> OPTForCausalLM:
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers,
                    num_attention_heads=heads, word_embed_proj_dim=hidden, max_position_embeddings=128,
                    attn_implementation="sdpa")
    return OPTForCausalLM(cfg).eval()


SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside any tiny vocabulary


def tiny_qwen3(heads: int = 4, kv_heads: int = 2, layers: int = 2, hidden: int = 32, ffn: int = 64,
               vocab: int = VOCAB) -> Qwen3ForCausalLM:
    """Qwen3: grouped-query attention with per-head q/k norms."""
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads, **SPECIAL)
    return Qwen3ForCausalLM(cfg).eval()


def tiny_phi3(heads: int = 4, kv_heads: int = 2, layers: int = 2, hidden: int = 32, ffn: int = 64,
              vocab: int = VOCAB) -> Phi3ForCausalLM:
    """Phi-3: fused qkv_proj [q | k | v] and fused gate_up_proj [gate | up]."""
    cfg = Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, **SPECIAL)
    return Phi3ForCausalLM(cfg).eval()


def tiny_gpt_neox(heads: int = 4, layers: int = 2, hidden: int = 32, ffn: int = 64,
                  vocab: int = VOCAB) -> GPTNeoXForCausalLM:
    """GPT-NeoX (Pythia): query_key_value interleaved per head, parallel attention and FFN, biases."""
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=heads, use_parallel_residual=True, **SPECIAL)
    return GPTNeoXForCausalLM(cfg).eval()


def tiny_gemma2(heads: int = 4, kv_heads: int = 2, layers: int = 2, hidden: int = 32, ffn: int = 64,
                head_dim: int = 16, window: int = 8, vocab: int = VOCAB) -> Gemma2ForCausalLM:
    """Gemma 2: sliding-window and global layers alternating, post-norms on attention and FFN outputs,
    head_dim != hidden / heads, logit soft-capping (eager attention)."""
    cfg = Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                       sliding_window=window, **SPECIAL)
    return Gemma2ForCausalLM(cfg).eval()


def tiny_gpt2(heads: int = 4, layers: int = 2, hidden: int = 32, ffn: int = 64, vocab: int = VOCAB) -> GPT2LMHeadModel:
    """GPT-2: Conv1D projections (weights stored (in, out)), fused c_attn [q | k | v]."""
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=128,
                     **SPECIAL)
    return GPT2LMHeadModel(cfg).eval()


def tiny_falcon(heads: int = 4, kv_heads: int = 2, layers: int = 2, hidden: int = 32, new_architecture: bool = True,
                multi_query: bool = False, vocab: int = VOCAB) -> FalconForCausalLM:
    """Falcon: query_key_value grouped per KV head (new architecture), or [q... | k | v] (multi-query),
    or interleaved per head; parallel attention and FFN. Eager attention: Falcon cannot switch later,
    and only eager attention's score and context matmuls are visible to torch's FLOP counter."""
    cfg = FalconConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_kv_heads=kv_heads, new_decoder_architecture=new_architecture, multi_query=multi_query,
                       attn_implementation="eager", **SPECIAL)
    return FalconForCausalLM(cfg).eval()


ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pad_token_id=1)


def tiny_bert(vocab: int = VOCAB, num_labels: int = 3) -> BertForSequenceClassification:
    return BertForSequenceClassification(BertConfig(vocab_size=vocab, num_labels=num_labels, **ENCODER)).eval()


def tiny_roberta(vocab: int = VOCAB) -> RobertaModel:
    return RobertaModel(RobertaConfig(vocab_size=vocab, max_position_embeddings=80, **ENCODER)).eval()


def tiny_distilbert(vocab: int = VOCAB) -> DistilBertModel:
    return DistilBertModel(DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                            pad_token_id=1)).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Words "t0".."t96" are the token ids (t0 doubles as unknown, padding and end of text)."""
    tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t0", eos_token="t0")


def batches(n: int = 4, batch: int = 4, seq: int = 32, pad_last: int = 0, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token batches; the last `pad_last` positions of every second row are padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad_last:
            mask[::2, seq - pad_last:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def clone(model: torch.nn.Module) -> torch.nn.Module:
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def save_tiny_causal_lm(folder, tokenizer) -> None:
    """A tiny random Llama saved with `tokenizer` (vocabulary sized to it), loadable by model.source=folder:
    for command-line tests that must not spend their time loading a real model."""
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_implementation="sdpa")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# The families whole-model methods (block_drop, SliceGPT) take: RMSNorm and grouped KV heads; LayerNorm and biases.
WHOLE_MODEL = {"llama": lambda layers: tiny_llama(heads=4, kv_heads=2, hidden=32, ffn=64, layers=layers),
               "opt": lambda layers: tiny_opt(layers=layers)}


def whole_model(family: str, layers: int) -> torch.nn.Module:
    """A WHOLE_MODEL family with `layers` blocks, the same weights on every call."""
    torch.manual_seed(0)
    return WHOLE_MODEL[family](layers)


def calibration() -> list[dict[str, torch.Tensor]]:
    """What prune() calibrates on: two batches of 16 tokens, every second row padded for the last 5."""
    return batches(2, batch=4, seq=16, pad_last=5)


def probe() -> dict[str, torch.Tensor]:
    """A padded batch unlike the calibration batches, to compare outputs and generate from."""
    return batches(1, batch=2, seq=12, pad_last=4, seed=3)[0]


def prune(pruner: Pruner, model: torch.nn.Module, flops: float) -> PruneOutcome:
    """`pruner` run on `model` at a kept FLOPs fraction (FLOPs at 16 tokens) on calibration()."""
    return PruneRunner(pruner, BudgetSpec(flops, 16), GramBackend(), progress=False).run(
        model, get_adapter(model), calibration(), torch.device("cpu"))
