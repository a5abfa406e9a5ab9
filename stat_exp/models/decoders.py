"""Adapters for decoder-only families: Llama-style (Llama, Mistral, Qwen2, SmolLM2) and OPT."""
from __future__ import annotations

from torch import nn

from stat_exp.models.base import AttentionParts, FFNParts, ModelAdapter


class LlamaAdapter(ModelAdapter):
    """Pre-norm blocks with (grouped-query) attention and a SwiGLU FFN."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def layers(self) -> list[nn.Module]:
        return list(self.model.model.layers)

    def attention(self, layer: nn.Module) -> AttentionParts:
        attn = layer.self_attn
        head_dim = attn.head_dim
        return AttentionParts(
            module=attn, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj,
            num_heads=attn.q_proj.out_features // head_dim,
            num_kv_heads=attn.k_proj.out_features // head_dim,
            head_dim=head_dim,
        )

    def ffn(self, layer: nn.Module) -> FFNParts:
        mlp = layer.mlp
        return FFNParts(up=mlp.up_proj, down=mlp.down_proj, gate=mlp.gate_proj)



class OPTAdapter(ModelAdapter):
    """OPT: multi-head attention with biases and a ReLU fc1/fc2 FFN."""

    model_types = ("opt",)

    def layers(self) -> list[nn.Module]:
        return list(self.model.model.decoder.layers)

    def attention(self, layer: nn.Module) -> AttentionParts:
        attn = layer.self_attn
        heads = attn.q_proj.out_features // attn.head_dim
        return AttentionParts(
            module=attn, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.out_proj,
            num_heads=heads, num_kv_heads=heads, head_dim=attn.head_dim,
        )

    def ffn(self, layer: nn.Module) -> FFNParts:
        return FFNParts(up=layer.fc1, down=layer.fc2)
