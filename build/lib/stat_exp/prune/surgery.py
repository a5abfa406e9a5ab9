"""Physical slicing of projections: the pruned model is smaller and runs with the stock modules."""
from __future__ import annotations

import torch
from torch import nn

from stat_exp.models.base import ModelAdapter
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


def prune_attention(adapter: ModelAdapter, layer: nn.Module, level: AttentionLevel,
                    o_weight: torch.Tensor | None = None, o_bias: torch.Tensor | None = None) -> None:
    """Keep the heads of `level`: Q rows, K/V rows of kept KV heads, O columns (or a corrected O)."""
    attn = adapter.attention(layer)
    if level.num_heads == attn.num_heads and o_weight is None and o_bias is None:
        return
    q_index = head_channels(level.heads, attn.head_dim)
    kv_index = head_channels(level.kv_heads, attn.head_dim)
    keep_outputs(attn.q, q_index)
    keep_outputs(attn.k, kv_index)
    keep_outputs(attn.v, kv_index)
    keep_inputs(attn.o, q_index, o_weight, o_bias)
    adapter.set_head_counts(layer, level.num_heads, level.num_kv_heads)


def prune_ffn(adapter: ModelAdapter, layer: nn.Module, keep: torch.Tensor,
              down_weight: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> None:
    """Keep the neurons `keep` (rows of gate/up, columns of down, or a corrected down)."""
    ffn = adapter.ffn(layer)
    for proj in ffn.inputs:
        keep_outputs(proj, keep)
    keep_inputs(ffn.down, keep, down_weight, down_bias)


def add_zero_bias(linear: nn.Linear) -> None:
    """Give a bias-free Linear a zero bias (a place for saved compensation biases to load into)."""
    if linear.bias is None:
        ref = linear.weight
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=ref.dtype, device=ref.device),
                                   requires_grad=ref.requires_grad)


def resize_to(adapter: ModelAdapter, structure: dict) -> None:
    """Shape an unpruned model like a pruned one (first units kept, biases added where pruning added
    them: structure["added_biases"] names Linear modules), so saved weights load into it."""
    for i, layer in enumerate(adapter.layers()):
        attn = adapter.attention(layer)
        heads, kv = structure["heads"][i], structure["kv_heads"][i]
        group = heads // kv
        level = AttentionLevel(tuple(g * attn.group_size + j for g in range(kv) for j in range(group)), tuple(range(kv)))
        if (heads, kv) != (attn.num_heads, attn.num_kv_heads):
            prune_attention(adapter, layer, level)
        if structure["neurons"][i] != adapter.ffn(layer).width:
            prune_ffn(adapter, layer, torch.arange(structure["neurons"][i]))
    for name in structure.get("added_biases", []):
        add_zero_bias(adapter.model.get_submodule(name))
