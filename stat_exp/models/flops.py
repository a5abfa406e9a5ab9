"""The FLOPs model and the parameter accounting of the prunable projections.

FLOPs are counted from the real matmul shapes of each block at `seq_len` tokens: the Q/K/V/O
projections, attention scores and context (every query attends to seq_len keys), and the FFN.
Scores are counted in full, also for causal blocks, as eager attention computes them. The
budget is the kept fraction of these prunable FLOPs; embeddings and the LM head are outside.
A block whose residual stream is sliced (SliceGPT) reads and writes narrower widths than its
hidden size and multiplies its residual by shortcut matrices; both are counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from stat_exp.models.base import AttentionParts, FFNParts, ModelAdapter


@dataclass(frozen=True)
class LayerShape:
    """What the FLOPs of one block depend on.

    `hidden` is the width the attention output writes; `attn_in`, `ffn_in` and `ffn_out` the widths
    the Q/K/V projections read, the FFN reads and the FFN writes (all `hidden` unless the residual
    stream is sliced); `shortcut` the weights of the block's residual shortcut matrices (0 without)."""

    hidden: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    ffn_width: int
    ffn_matrices: int  # 2 for up/down, 3 when gated (a fused gate_up is still two matrices' work)
    attn_in: int = 0  # 0: hidden (an unsliced block, or a shape recorded before these fields)
    ffn_in: int = 0
    ffn_out: int = 0
    shortcut: int = 0

    def __post_init__(self) -> None:
        for key in ("attn_in", "ffn_in", "ffn_out"):
            if not getattr(self, key):
                object.__setattr__(self, key, self.hidden)

    @classmethod
    def of(cls, attn: AttentionParts, ffn: FFNParts, shortcut: int = 0) -> "LayerShape":
        return cls(hidden=attn.o.out_features, head_dim=attn.head_dim, num_heads=attn.num_heads,
                   num_kv_heads=attn.num_kv_heads, ffn_width=ffn.width, ffn_matrices=ffn.matrices,
                   attn_in=attn.reader.in_features, ffn_in=ffn.reader.in_features, ffn_out=ffn.down.out_features,
                   shortcut=shortcut)


def attention_weights(shape: LayerShape, num_heads: int, num_kv_heads: int) -> int:
    """Weights of the Q/K/V/O projections (no biases) with these head counts."""
    return shape.head_dim * (num_heads * (shape.attn_in + shape.hidden) + 2 * num_kv_heads * shape.attn_in)


def ffn_weights(shape: LayerShape, neurons: int) -> int:
    """Weights of the FFN projections (no biases) with `neurons` kept."""
    return neurons * ((shape.ffn_matrices - 1) * shape.ffn_in + shape.ffn_out)


def layer_weights(shape: LayerShape) -> int:
    """Weights of every matrix of the block as it is (projections and shortcuts, no biases)."""
    return (attention_weights(shape, shape.num_heads, shape.num_kv_heads) + ffn_weights(shape, shape.ffn_width)
            + shape.shortcut)


@dataclass(frozen=True)
class FlopsModel:
    """Multiply-adds x 2 of one block at `seq_len` tokens."""

    seq_len: int

    def attention(self, shape: LayerShape, num_heads: int, num_kv_heads: int) -> float:
        s = self.seq_len
        scores_and_context = 2 * s * num_heads * shape.head_dim
        return 2.0 * s * (attention_weights(shape, num_heads, num_kv_heads) + scores_and_context)

    def ffn(self, shape: LayerShape, neurons: int) -> float:
        return 2.0 * self.seq_len * ffn_weights(shape, neurons)

    def layer(self, shape: LayerShape, num_heads: int, num_kv_heads: int, neurons: int) -> float:
        return (self.attention(shape, num_heads, num_kv_heads) + self.ffn(shape, neurons)
                + 2.0 * self.seq_len * shape.shortcut)

    def dense(self, shape: LayerShape) -> float:
        return self.layer(shape, shape.num_heads, shape.num_kv_heads, shape.ffn_width)


def prunable_params(adapter: ModelAdapter) -> int:
    """Parameters of the projections pruning can cut (attention and FFN of every block), and of the
    residual shortcut matrices of sliced blocks."""
    total = 0
    for layer in adapter.layers():
        for lin in (*adapter.attention(layer).projections, *adapter.ffn(layer).projections):
            total += sum(p.numel() for p in lin.parameters())
        total += sum(m.numel() for m in adapter.shortcuts(layer))
    return total


def shapes_of(adapter: ModelAdapter) -> list[LayerShape]:
    return [LayerShape.of(adapter.attention(l), adapter.ffn(l), sum(m.numel() for m in adapter.shortcuts(l)))
            for l in adapter.layers()]


def model_flops(adapter: ModelAdapter, flops: FlopsModel) -> float:
    """Prunable FLOPs of the model as it is now."""
    return sum(flops.layer(s, s.num_heads, s.num_kv_heads, s.ffn_width) for s in shapes_of(adapter))
