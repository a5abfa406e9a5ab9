"""What an attention module reads at run time about its heads, kept right after heads are cut.

Stock transformers modules keep head counts in different places: attributes of the attention
module (`num_heads` in GPT-2, OPT and Falcon, `num_key_value_groups` in Llama-style models,
`split_size` in GPT-2, `all_head_size` in BERT, ...), or the model config itself, which every
layer shares (Phi-3 reads `config.num_attention_heads` in its forward). After slicing, each
layer gets its own values: the attributes are updated in place, and the module's config is
replaced by a per-layer view that overrides the head counts and reads everything else live from
the shared config (so later changes, e.g. `set_attn_implementation`, still reach the layer).
"""
from __future__ import annotations

from typing import Any

from torch import nn

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
GROUP_ATTRS = ("num_key_value_groups", "num_kv_groups")
QUERY_WIDTH_ATTRS = ("split_size", "all_head_size")  # heads x head_dim
CONFIG_HEAD_KEYS = ("num_attention_heads",)
CONFIG_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads")


class LayerConfig:
    """A per-layer view of a shared model config: some values overridden, the rest read live."""

    def __init__(self, shared: Any, **overrides: Any):
        self.__dict__["_shared"] = shared
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        if name == "_shared":  # not yet set (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self._shared, name)

    @property
    def shared(self) -> Any:
        return self._shared


def shared_config(config: Any) -> Any:
    return config.shared if isinstance(config, LayerConfig) else config


def update_head_bookkeeping(module: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Set every head count `module` (and its config) carries to the new per-layer values."""
    values = {**dict.fromkeys(HEAD_ATTRS, num_heads), **dict.fromkeys(KV_HEAD_ATTRS, num_kv_heads),
              **dict.fromkeys(GROUP_ATTRS, num_heads // num_kv_heads),
              **dict.fromkeys(QUERY_WIDTH_ATTRS, num_heads * head_dim)}
    for name, value in values.items():
        if name in vars(module):
            setattr(module, name, value)
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, CONFIG_HEAD_KEYS[0]):
        shared = shared_config(config)
        overrides = {**{k: num_heads for k in CONFIG_HEAD_KEYS if hasattr(shared, k)},
                     **{k: num_kv_heads for k in CONFIG_KV_HEAD_KEYS if hasattr(shared, k)}}
        module.config = LayerConfig(shared, **overrides)
