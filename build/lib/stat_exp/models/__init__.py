"""Model adapters, dispatched on `config.model_type` (never on a model name)."""
from __future__ import annotations

from torch import nn

from stat_exp.errors import UserError
from stat_exp.models.base import AttentionParts, FFNParts, ModelAdapter
from stat_exp.models.decoders import LlamaAdapter, OPTAdapter
from stat_exp.models.encoders import BertAdapter, DistilBertAdapter

ADAPTERS: list[type[ModelAdapter]] = [LlamaAdapter, OPTAdapter, BertAdapter, DistilBertAdapter]


class UnsupportedModelError(UserError, ValueError):
    """A model family without an adapter."""


def register_adapter(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Make an adapter available for its model types (usable as a class decorator)."""
    ADAPTERS.append(adapter)
    return adapter


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`, chosen by its config.model_type."""
    model_type = getattr(model.config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model)
    raise UnsupportedModelError(
        f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
    )


__all__ = ["ADAPTERS", "AttentionParts", "FFNParts", "ModelAdapter", "UnsupportedModelError",
           "get_adapter", "register_adapter", "supported_model_types"]
