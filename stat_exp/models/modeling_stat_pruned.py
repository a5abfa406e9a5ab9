"""Pruned transformers models, loadable with `from_pretrained(folder, trust_remote_code=True)`.

This file ships inside every saved pruned folder whose layers differ in shape; config.json's
`auto_map` points the Auto classes here (e.g. "modeling_stat_pruned.LlamaForCausalLM"). It needs
only torch and transformers, never stat_exp, and knows no model family: any stock class name
resolves to a subclass that builds the stock model and then applies what config.json records
under `stat_exp_pruning`, by module name relative to the base model (so task heads and bare
encoders share it):
- "parameters": {name: shape} of the state-dict tensors pruning resized (rows or columns cut) or
  created (e.g. a compensation bias); Linear and Conv1D sizes follow their new weights;
- "attributes": {module: {attribute: value}} of the plain attributes forward passes read at run
  time (e.g. num_key_value_groups, num_heads, split_size) that pruning changed;
- "configs": {module: {key: value}} for modules whose forward reads head counts from the model
  config (e.g. Phi-3): the module gets a per-layer view of the config with these values.
The reshape runs inside __init__, before from_pretrained loads the weights into those shapes.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

RECORD_KEY = "stat_exp_pruning"


class LayerConfig:
    """A per-layer view of the shared model config: recorded values overridden, the rest read
    live (so later changes such as set_attn_implementation still reach the layer)."""

    def __init__(self, shared: Any, **overrides: Any):
        self.__dict__.update(_shared=shared, **overrides)

    def __getattr__(self, name: str) -> Any:
        if name == "_shared":  # not yet set (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self._shared, name)


def _resized(old: torch.Tensor | None, shape: list[int], owner: nn.Module, name: str) -> torch.Tensor:
    """The leading block of `old` in `shape` (zeros where pruning created the tensor), so a model
    built without weights is still a sane model; from_pretrained overwrites it."""
    if old is None:
        ref = next(owner.parameters())
        return torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    if old.dim() != len(shape) or any(n > o for n, o in zip(shape, old.shape)):
        raise ValueError(f"{RECORD_KEY}: {name} cannot be cut from {tuple(old.shape)} to {tuple(shape)}")
    return old.detach()[tuple(slice(0, n) for n in shape)].clone()


def _sync_sizes(module: nn.Module) -> None:
    """Linear and Conv1D keep their sizes as attributes that their forward (or repr) reads."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, Conv1D):
        module.nx, module.nf = module.weight.shape


def apply_record(base: nn.Module, record: dict) -> None:
    """Give the freshly built stock base model the recorded shapes, attributes and configs."""
    for name, shape in record.get("parameters", {}).items():
        owner_name, _, attr = name.rpartition(".")
        owner = base.get_submodule(owner_name)
        if attr in owner._buffers:
            owner._buffers[attr] = _resized(owner._buffers[attr], shape, owner, name)
        else:
            old = getattr(owner, attr, None)
            new = _resized(old, shape, owner, name)
            setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad if old is not None else True))
        _sync_sizes(owner)
    for module_name, attributes in record.get("attributes", {}).items():
        module = base.get_submodule(module_name)
        for key, value in attributes.items():
            setattr(module, key, value)
    for module_name, overrides in record.get("configs", {}).items():
        module = base.get_submodule(module_name)
        module.config = LayerConfig(module.config, **overrides)


@functools.cache
def pruned_class(stock: type) -> type:
    """The subclass of a stock transformers model class that applies the pruning record."""

    class Pruned(stock):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            apply_record(self.base_model, getattr(config, RECORD_KEY, None) or {})

        @classmethod
        def is_custom_code(cls) -> bool:
            """The stock code with other shapes: the stock checkpoint key conversions apply
            (e.g. GPT-NeoX saves its lm_head as embed_out)."""
            return False

    Pruned.__name__ = Pruned.__qualname__ = stock.__name__
    Pruned.__doc__ = f"{stock.__name__} with per-layer shapes from config.json ({RECORD_KEY})."
    return Pruned


def __getattr__(name: str) -> type:
    """`modeling_stat_pruned.<StockClassName>`: how auto_map names the pruned classes."""
    stock = None if name.startswith("_") else getattr(transformers, name, None)
    if not (isinstance(stock, type) and issubclass(stock, transformers.PreTrainedModel)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return pruned_class(stock)
