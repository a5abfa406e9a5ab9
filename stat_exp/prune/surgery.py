"""Physical slicing of projections: the pruned model is smaller and runs with the stock modules."""
from __future__ import annotations

import torch
from torch import nn

from stat_exp.models.base import AttentionParts, FFNParts, ModelAdapter
from stat_exp.prune.scores import AttentionLevel


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Swap a Linear's parameters in place (no parent lookups, hooks and names stay valid)."""
    ref = linear.weight
    linear.weight = nn.Parameter(weight.to(ref.dtype).to(ref.device).contiguous(), requires_grad=ref.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(ref.dtype).to(ref.device).contiguous(), requires_grad=ref.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def keep_outputs(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep the output rows `index` (and their bias entries)."""
    index = index.to(linear.weight.device)
    bias = linear.bias[index] if linear.bias is not None else None
    _set_linear(linear, linear.weight[index], bias)


def keep_inputs(linear: nn.Linear, index: torch.Tensor, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> None:
    """Keep the input columns `index`; `weight`/`bias` replace them when a correction was folded in."""
    new = linear.weight[:, index.to(linear.weight.device)] if weight is None else weight
    _set_linear(linear, new, bias)


def head_channels(heads: list[int] | tuple[int, ...], head_dim: int) -> torch.Tensor:
    """Channel indices of the given heads in a concatenated (heads x head_dim) layout."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]) if heads else torch.zeros(0, dtype=torch.long)


def qkv_rows(attn: AttentionParts, level: AttentionLevel) -> torch.Tensor:
    """Rows of a fused Q/K/V projection that hold the heads of `level`, in the fused layout of a
    block with only those heads (see `QKVLayout`)."""
    d, h, kv = attn.head_dim, attn.num_heads, attn.num_kv_heads
    q, k = head_channels(level.heads, d), head_channels(level.kv_heads, d)
    if attn.qkv_layout == "concat":
        return torch.cat([q, h * d + k, (h + kv) * d + k])
    group = attn.group_size
    members = {g: [j for j in level.heads if j // group == g] for g in level.kv_heads}
    if len({len(m) for m in members.values()}) > 1:
        raise ValueError(f"a grouped fused QKV keeps the same number of query heads in every KV group, not {level}")
    stride = (group + 2) * d  # rows per KV group: its query heads, then K, then V
    blocks = []
    for g, heads in members.items():
        slots = [j % group for j in heads] + [group, group + 1]
        blocks += [g * stride + s * d + torch.arange(d) for s in slots]
    return torch.cat(blocks)


def attention_rows(attn: AttentionParts, level: AttentionLevel) -> list[tuple[nn.Linear, torch.Tensor]]:
    """(projection, output rows to keep) for the Q/K/V side of `level`."""
    if attn.qkv is not None:
        return [(attn.qkv, qkv_rows(attn, level))]
    kv = head_channels(level.kv_heads, attn.head_dim)
    return [(attn.q, head_channels(level.heads, attn.head_dim)), (attn.k, kv), (attn.v, kv)]


def ffn_rows(ffn: FFNParts, keep: torch.Tensor) -> list[tuple[nn.Linear, torch.Tensor]]:
    """(projection, output rows to keep) for the neurons `keep`: a fused [gate | up] keeps both halves."""
    if ffn.gate_up is not None:
        return [(ffn.gate_up, torch.cat([keep, ffn.width + keep]))]
    return [(m, keep) for m in (ffn.gate, ffn.up) if m is not None]


def prune_attention(adapter: ModelAdapter, layer: nn.Module, level: AttentionLevel,
                    o_weight: torch.Tensor | None = None, o_bias: torch.Tensor | None = None) -> None:
    """Keep the heads of `level`: Q rows, K/V rows of kept KV heads, O columns (or a corrected O)."""
    attn = adapter.attention(layer)
    if level.num_heads == attn.num_heads and o_weight is None and o_bias is None:
        return
    for projection, rows in attention_rows(attn, level):
        keep_outputs(projection, rows)
    keep_inputs(attn.o, head_channels(level.heads, attn.head_dim), o_weight, o_bias)
    adapter.set_head_counts(layer, level.num_heads, level.num_kv_heads)


def prune_ffn(adapter: ModelAdapter, layer: nn.Module, keep: torch.Tensor,
              down_weight: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> None:
    """Keep the neurons `keep` (rows of gate/up, columns of down, or a corrected down)."""
    ffn = adapter.ffn(layer)
    for projection, rows in ffn_rows(ffn, keep):
        keep_outputs(projection, rows)
    keep_inputs(ffn.down, keep, down_weight, down_bias)
