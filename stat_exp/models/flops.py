"""The FLOPs model and the parameter accounting of the prunable projections.

FLOPs are counted from the real matmul shapes of each block at `seq_len` tokens: the Q/K/V/O
projections, attention scores and context (every query attends to seq_len keys), and the FFN.
Scores are counted in full, also for causal blocks, as eager attention computes them. The
budget is the kept fraction of these prunable FLOPs; embeddings and the LM head are outside.
"""
from __future__ import annotations

from dataclasses import dataclass

from stat_exp.models.base import AttentionParts, FFNParts, ModelAdapter


@dataclass(frozen=True)
class LayerShape:
    """What the FLOPs of one block depend on."""

    hidden: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    ffn_width: int
    ffn_matrices: int  # 2 for up/down, 3 when gated (a fused gate_up is still two matrices' work)

    @classmethod
    def of(cls, attn: AttentionParts, ffn: FFNParts) -> "LayerShape":
        return cls(hidden=attn.o.out_features, head_dim=attn.head_dim, num_heads=attn.num_heads,
                   num_kv_heads=attn.num_kv_heads, ffn_width=ffn.width, ffn_matrices=ffn.matrices)


@dataclass(frozen=True)
class FlopsModel:
    """Multiply-adds x 2 of one block at `seq_len` tokens."""

    seq_len: int

    def attention(self, shape: LayerShape, num_heads: int, num_kv_heads: int) -> float:
        d, hd, s = shape.hidden, shape.head_dim, self.seq_len
        projections = d * hd * (2 * num_heads + 2 * num_kv_heads)  # q, o and k, v
        scores_and_context = 2 * s * num_heads * hd
        return 2.0 * s * (projections + scores_and_context)

    def ffn(self, shape: LayerShape, neurons: int) -> float:
        return 2.0 * self.seq_len * shape.ffn_matrices * shape.hidden * neurons

    def layer(self, shape: LayerShape, num_heads: int, num_kv_heads: int, neurons: int) -> float:
        return self.attention(shape, num_heads, num_kv_heads) + self.ffn(shape, neurons)

    def dense(self, shape: LayerShape) -> float:
        return self.layer(shape, shape.num_heads, shape.num_kv_heads, shape.ffn_width)



def prunable_params(adapter: ModelAdapter) -> int:
    """Parameters of the projections pruning can cut (attention and FFN of every block)."""
    total = 0
    for layer in adapter.layers():
        for lin in (*adapter.attention(layer).projections, *adapter.ffn(layer).projections):
            total += sum(p.numel() for p in lin.parameters())
    return total


def shapes_of(adapter: ModelAdapter) -> list[LayerShape]:
    return [LayerShape.of(adapter.attention(l), adapter.ffn(l)) for l in adapter.layers()]


def model_flops(adapter: ModelAdapter, flops: FlopsModel) -> float:
    """Prunable FLOPs of the model as it is now."""
    return sum(flops.layer(s, s.num_heads, s.num_kv_heads, s.ffn_width) for s in shapes_of(adapter))
