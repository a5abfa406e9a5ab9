"""Model adapters: an adapter from the config, else the explicit adapter registered for
`config.model_type` (never a model name), else discovery from the blocks' modules."""
from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from stat_exp.errors import ConfigError
from stat_exp.models.base import AttentionParts, FFNParts, ModelAdapter, UnsupportedModelError
from stat_exp.models.decoders import LlamaAdapter, OPTAdapter
from stat_exp.models.discovery import DiscoveredAdapter
from stat_exp.models.encoders import BertAdapter, DistilBertAdapter

AdapterFactory = Callable[[nn.Module], ModelAdapter]
ADAPTERS: list[type[ModelAdapter]] = [LlamaAdapter, OPTAdapter, BertAdapter, DistilBertAdapter]
_CHOSEN = "_stat_exp_adapter"  # attribute of a model given an adapter explicitly


def explicit_model_types() -> list[str]:
    """Model types with an explicit adapter (all others go through discovery)."""
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_from_config(cfg: Mapping | None) -> AdapterFactory | None:
    """`model.adapter` of a run config ({_target_: module.Class, ...options}) as a factory taking the
    model; None when unset (no config, or `_target_: null` and no options). Resolved before any weights load, so a bad target fails first."""
    if cfg is None or (isinstance(cfg, Mapping) and cfg.get("_target_") is None
                       and set(cfg) <= {"_target_", "_partial_"}):
        return None
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = cfg.get("_target_") if isinstance(cfg, Mapping) else None
    try:
        factory = instantiate(cfg, _partial_=True) if target else None
    except InstantiationException as e:
        raise ConfigError(f"model.adapter._target_={target!r} cannot be imported: "
                          f"{str(e.__cause__ or e).strip().splitlines()[0]}") from e
    if factory is None or not (isinstance(factory.func, type) and issubclass(factory.func, ModelAdapter)):
        raise ConfigError(f"model.adapter={dict(cfg)!r}: _target_ must name a subclass of "
                          "stat_exp.models.ModelAdapter")
    return factory


def get_adapter(model: nn.Module, adapter: AdapterFactory | None = None) -> ModelAdapter:
    """The adapter of `model`: `adapter` when given (and from then on for this model: saving and
    reloading call get_adapter(model) again), else the one chosen before, else the explicit
    adapter for config.model_type, else discovery."""
    if adapter is not None:
        object.__setattr__(model, _CHOSEN, adapter)
    chosen = getattr(model, _CHOSEN, None)
    if chosen is not None:
        return chosen(model)
    model_type = getattr(model.config, "model_type", None)
    for explicit in ADAPTERS:
        if model_type in explicit.model_types:
            return explicit(model)
    return DiscoveredAdapter(model)


__all__ = ["ADAPTERS", "AttentionParts", "DiscoveredAdapter", "FFNParts", "ModelAdapter", "UnsupportedModelError",
           "adapter_from_config", "explicit_model_types", "get_adapter"]
