"""GPT-2's Conv1D projections as nn.Linear, with the stock checkpoint layout kept.

Conv1D (GPT-2, and models copied from it) stores its weight as (in, out); every consumer here
reads projections as nn.Linear, (out, in). Converting the modules once, at adapter time, keeps
all of them correct, and GPT-2's forward only calls the module, so it runs unchanged. The state
dict still holds the (in, out) layout, so saved checkpoints load into stock GPT-2 and stock
checkpoints load into converted modules.
"""
from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D


class TransposedLinear(nn.Linear):
    """An nn.Linear whose state dict holds the weight transposed, as Conv1D does."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        destination[key] = destination[key].t() if keep_vars else destination[key].t().contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = state_dict[key].t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def as_linear(conv: Conv1D) -> TransposedLinear:
    """The same map as `conv`, as a Linear (its parameters copied into (out, in) layout)."""
    weight = conv.weight
    linear = TransposedLinear(conv.nx, conv.nf, bias=conv.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
    if conv.bias is not None:
        linear.bias = conv.bias
    return linear


def convert_conv1d(module: nn.Module) -> None:
    """Replace every Conv1D inside `module` by an equivalent TransposedLinear."""
    targets = [(name, child) for name, child in module.named_modules() if isinstance(child, Conv1D)]
    for name, conv in targets:
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, as_linear(conv))

