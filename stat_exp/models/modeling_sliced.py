"""SliceGPT-sliced transformers models, loadable with `from_pretrained(folder, trust_remote_code=True)`.

SliceGPT (Ashkboos et al., ICLR 2024) rotates the residual stream of a pre-norm decoder into the
principal axes of its calibration signals and keeps the leading ones, so the stream is narrower
than the stock model's and changes basis (and width) twice per block. Three things differ from the
stock model, and this file (shipped beside modeling_stat_pruned.py in the saved folder, needing
only torch and transformers) adds exactly them, after building the stock model:
- every norm that reads the residual stream is an `RMSN`: x / sqrt(sum(x^2) / mean_dim + eps)
  with the dense width as `mean_dim` and no weights (they are fused into the next linears);
- each block carries two shortcut matrices, `attn_shortcut` (d_in x d_mid) and `mlp_shortcut`
  (d_mid x d_out), that take the residual into the basis the sublayer writes in;
- tensor shapes (embeddings, projections, LM head) follow config.json's record.
Which modules are the norms, the attention and the FFN of a block is recorded by name (`layout`),
so the file knows no family. Dropout is not applied: sliced models are for inference.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import transformers
from torch import nn

from .modeling_stat_pruned import RECORD_KEY, apply_record

SLICED_KEY = "sliced"
SPEC_ATTR = "sliced_spec"  # the model's own copy of its spec (what config.json records)


class RMSN(nn.Module):
    """RMS normalisation over `mean_dim` channels (the dense width, also when fewer are kept)."""

    def __init__(self, mean_dim: int, eps: float):
        super().__init__()
        self.mean_dim, self.eps = mean_dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        variance = x32.square().sum(-1, keepdim=True) / self.mean_dim
        return (x32 * torch.rsqrt(variance + self.eps)).to(x.dtype)


def _sliced_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A pre-norm block whose residual changes basis through the shortcut matrices."""
    layout = self.sliced_layout
    kwargs.pop("output_attentions", None)
    attn_out = self.get_submodule(layout["attn"])(self.get_submodule(layout["norms"][0])(hidden_states), *args, **kwargs)
    attn_out = attn_out[0] if isinstance(attn_out, tuple) else attn_out
    hidden_states = hidden_states @ self.attn_shortcut.to(hidden_states.dtype) + attn_out
    x = self.get_submodule(layout["norms"][1])(hidden_states)
    for name in layout["mlp"]:
        x = getattr(self, name)(x)
    return hidden_states @ self.mlp_shortcut.to(hidden_states.dtype) + x


@functools.cache
def sliced_layer_class(stock: type) -> type:
    """The stock block class with the shortcut forward (same parameters plus the shortcuts)."""
    return type(stock.__name__, (stock,), {"forward": _sliced_forward, "__module__": __name__})


def convert(model: nn.Module, spec: dict[str, Any]) -> None:
    """Give a stock model the sliced structure `spec` describes (its norms, blocks and shortcut
    shapes); weights are loaded or computed afterwards. `spec`: {"layers": path of the block list,
    "layout": names inside a block, "final_norm": path, "mean_dim", "eps", "dims": [[d_in, d_mid,
    d_out] per block], and in a saved folder "parameters": {name: shape} of the tensors whose
    shapes differ from what this conversion builds}."""
    def rmsn() -> RMSN:
        return RMSN(spec["mean_dim"], spec["eps"])

    layout = spec["layout"]
    for layer, (d_in, d_mid, d_out) in zip(model.get_submodule(spec["layers"]), spec["dims"]):
        ref = next(layer.parameters())
        for norm in layout["norms"]:
            _replace(layer, norm, rmsn())
        layer.__class__ = sliced_layer_class(type(layer))
        layer.sliced_layout = layout
        layer.attn_shortcut = nn.Parameter(torch.eye(d_in, d_mid, dtype=ref.dtype, device=ref.device))
        layer.mlp_shortcut = nn.Parameter(torch.eye(d_mid, d_out, dtype=ref.dtype, device=ref.device))
    _replace(model, spec["final_norm"], rmsn())
    setattr(model, SPEC_ATTR, spec)


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, name, module)


@functools.cache
def sliced_class(stock: type) -> type:
    """The subclass of a stock transformers model class that builds the recorded sliced model."""

    class Sliced(stock):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            record = getattr(config, RECORD_KEY)
            convert(self, record[SLICED_KEY])
            apply_record(self, {"parameters": record[SLICED_KEY]["parameters"]})

    Sliced.__name__ = Sliced.__qualname__ = stock.__name__
    Sliced.__doc__ = f"{stock.__name__} sliced by SliceGPT, as config.json records ({RECORD_KEY}.{SLICED_KEY})."
    return Sliced


def __getattr__(name: str) -> type:
    """`modeling_sliced.<StockClassName>`: how auto_map names the sliced classes."""
    stock = None if name.startswith("_") else getattr(transformers, name, None)
    if not (isinstance(stock, type) and issubclass(stock, transformers.PreTrainedModel)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return sliced_class(stock)
