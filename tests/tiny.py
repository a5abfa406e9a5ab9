"""Tiny randomly initialised models and calibration batches, built in-process for fast tests."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

VOCAB = 97


def tiny_llama(heads: int = 8, kv_heads: int = 2, layers: int = 2, hidden: int = 64, ffn: int = 128,
               bias: bool = False) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                      attention_bias=bias, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(heads: int = 4, kv_heads: int = 2, layers: int = 2, hidden: int = 32, ffn: int = 96) -> Qwen2ForCausalLM:
    """Qwen2: grouped-query attention with biases on Q/K/V."""
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).eval()


def tiny_mistral(heads: int = 4, kv_heads: int = 1, layers: int = 2, hidden: int = 32, ffn: int = 96) -> MistralForCausalLM:
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                        sliding_window=None, attn_implementation="sdpa")
    return MistralForCausalLM(cfg).eval()


def tiny_opt(heads: int = 4, layers: int = 2, hidden: int = 32, ffn: int = 128) -> OPTForCausalLM:
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers,
                    num_attention_heads=heads, word_embed_proj_dim=hidden, max_position_embeddings=128,
                    attn_implementation="sdpa")
    return OPTForCausalLM(cfg).eval()


def tiny_bert_classifier(heads: int = 4, layers: int = 2, hidden: int = 32, ffn: int = 64,
                         labels: int = 3) -> BertForSequenceClassification:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=128, num_labels=labels, attn_implementation="sdpa")
    return BertForSequenceClassification(cfg).eval()


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
