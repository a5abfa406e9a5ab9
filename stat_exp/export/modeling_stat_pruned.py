"""Pruned transformers models, loadable with `from_pretrained(folder, trust_remote_code=True)`.

This file ships inside every saved pruned folder whose layers differ in shape; config.json's
`auto_map` points the Auto classes here (e.g. "modeling_stat_pruned.LlamaForCausalLM"). It needs
only torch and transformers, never stat_exp, and knows no model family: any stock class name
resolves to a subclass that builds the stock model and then applies what config.json records
under `stat_exp_pruning`:
- "parameters": {name: shape} of the parameters pruning resized (rows or columns cut) or created
  (e.g. a compensation bias), relative to the base model, so task heads and bare encoders share it;
- "attributes": {module name: {attribute: value}} of the plain attributes forward passes read at
  run time (e.g. num_key_value_groups, num_heads, Linear.out_features) that pruning changed.
The reshape runs inside __init__, before from_pretrained loads the weights into those shapes.
"""
from __future__ import annotations

import functools

import torch
import transformers
from torch import nn

RECORD_KEY = "stat_exp_pruning"


def apply_record(base: nn.Module, record: dict) -> None:
    """Give the freshly built stock base model the recorded parameter shapes and attributes.

    A resized parameter starts as the leading block of the stock one and a created one as zeros,
    so a model built without weights is still a sane model; from_pretrained overwrites both."""
    for name, shape in record.get("parameters", {}).items():
        owner_name, _, attr = name.rpartition(".")
        owner = base.get_submodule(owner_name)
        old = getattr(owner, attr, None)
        if old is None:
            ref = next(owner.parameters())
            new = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
        elif old.dim() != len(shape) or any(n > o for n, o in zip(shape, old.shape)):
            raise ValueError(f"{RECORD_KEY}: parameter {name} cannot be cut from {tuple(old.shape)} to {tuple(shape)}")
        else:
            new = old.detach()[tuple(slice(0, n) for n in shape)].clone()
        setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad if old is not None else True))
    for module_name, attributes in record.get("attributes", {}).items():
        module = base.get_submodule(module_name)
        for key, value in attributes.items():
            setattr(module, key, value)


@functools.cache
def pruned_class(stock: type) -> type:
    """The subclass of a stock transformers model class that applies the pruning record."""

    class Pruned(stock):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            apply_record(self.base_model, getattr(config, RECORD_KEY, None) or {})

    Pruned.__name__ = Pruned.__qualname__ = stock.__name__
    Pruned.__doc__ = f"{stock.__name__} with per-layer shapes from config.json ({RECORD_KEY})."
    return Pruned


def __getattr__(name: str) -> type:
    """`modeling_stat_pruned.<StockClassName>`: how auto_map names the pruned classes."""
    stock = None if name.startswith("_") else getattr(transformers, name, None)
    if not (isinstance(stock, type) and issubclass(stock, transformers.PreTrainedModel)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return pruned_class(stock)
