"""What config.json says about a pruned model, so that stock loaders rebuild it.

Pruning changes tensor shapes, a few plain module attributes (head counts, KV groups,
Linear.out_features) and, for modules whose forward reads head counts from the model config
(Phi-3), gives them a per-layer config view; the shared config is never touched. Comparing the
pruned model with the stock model its config builds finds every change, whatever the family,
and decides the export:
- nothing changed: the config as it is;
- every layer keeps the same counts and a config with those counts builds exactly the pruned
  model (checked on shapes, attributes, and outputs with the pruned weights): that stock config
  (no custom code, no trust_remote_code);
- else: the config plus the changes (`parameters`, `attributes`, `configs`) and an auto_map to
  the shipped modeling file, which applies them after building the stock model.
Every export also records the task, the per-layer structure and the dense model's layer shapes
(carried over from a pruned input), so later runs report fractions against the dense model.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from stat_exp.errors import UserError
from stat_exp.models import get_adapter
from stat_exp.models.flops import LayerShape, prunable_params, shapes_of
from stat_exp.models.loading import TASKS
from stat_exp.models.modeling_sliced import SLICED_KEY, SPEC_ATTR, convert
from stat_exp.models.modeling_stat_pruned import RECORD_KEY

MODELING_MODULE = "modeling_stat_pruned"
SLICED_MODULE = "modeling_sliced"  # ships beside MODELING_MODULE, which it imports
FORMAT = 1
# Config keys that set the per-layer counts, by family (attribute_map covers aliases such as GPT-2's n_head).
HEAD_KEYS = ("num_attention_heads",)
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads")
FFN_KEYS = ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner", "hidden_dim")
_SCALARS = (bool, int, float, str, type(None))
_MISSING = object()


class ExportError(UserError):
    """A model this exporter cannot describe in config.json."""


def stock_class(model: nn.Module) -> type:
    """The transformers class a (possibly pruned-subclass) model is built from."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls
    raise ExportError(f"{type(model).__name__} is not a transformers model class; cannot export it")


def stock_model(model: nn.Module, config: PretrainedConfig) -> nn.Module:
    """The stock model `config` builds, on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        return stock_class(model)(config)


def _scalars(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items()
            if not k.startswith("_") and k != "training" and isinstance(v, _SCALARS)}


def _config_overrides(module: nn.Module, shared: PretrainedConfig) -> dict[str, Any]:
    """The values of a per-layer config view (which pruning gives a module whose forward reads
    head counts from the config) that differ from the shared model config."""
    config = vars(module).get("config")
    if config is None or config is shared or not hasattr(config, "model_type"):
        return {}
    return {k: getattr(config, k) for k, v in _scalars(shared).items() if getattr(config, k, v) != v}


@dataclasses.dataclass
class Differences:
    """What pruning changed in a model against the stock model of its config, by name relative to
    the base model: state-dict tensor shapes, plain module attributes, per-module config values."""

    parameters: dict[str, list[int]]
    attributes: dict[str, dict[str, Any]]
    configs: dict[str, dict[str, Any]]

    def __bool__(self) -> bool:
        return bool(self.parameters or self.attributes or self.configs)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes as saved: the state dict (a module may keep a weight transposed, e.g. Conv1D as Linear)."""
    return {n: tuple(t.shape) for n, t in module.state_dict(keep_vars=True).items()}


def differences(model: nn.Module, reference: nn.Module) -> Differences:
    """How `model`'s base model differs from `reference`'s (the stock model of a config)."""
    base, ref = model.base_model, reference.base_model
    own, ref_shapes = _shapes(base), _shapes(ref)
    dropped = sorted(set(ref_shapes) - set(own))
    if dropped:
        raise ExportError(f"tensors removed by pruning cannot be exported: {', '.join(dropped[:3])}")
    parameters = {n: list(shape) for n, shape in own.items() if ref_shapes.get(n) != shape}
    ref_modules = dict(ref.named_modules())
    attributes, configs = {}, {}
    for name, module in base.named_modules():
        if name not in ref_modules:
            raise ExportError(f"module {name!r} is not part of the stock {type(reference).__name__}; cannot export it")
        stock = ref_modules[name]
        if isinstance(module, type(stock)):  # a module converted to another class keeps its own bookkeeping
            theirs = _scalars(stock)
            changed = {k: v for k, v in _scalars(module).items() if theirs.get(k, _MISSING) != v}
            if changed:
                attributes[name] = changed
        if overrides := _config_overrides(module, model.config):
            configs[name] = overrides
    if model is not base:
        prefix = model.base_model_prefix + "."
        ref_all = _shapes(reference)
        outside = [n for n, shape in _shapes(model).items() if not n.startswith(prefix) and ref_all.get(n) != shape]
        if outside:
            raise ExportError(f"pruned tensors outside the base model cannot be exported: {', '.join(outside[:3])}")
    return Differences(parameters, attributes, configs)


def uniform_config(config: PretrainedConfig, structure: dict[str, list[int]], head_dim: int) -> PretrainedConfig | None:
    """A stock config with the counts every layer shares (explicit head_dim), or None when layers differ."""
    if any(len(set(structure[key])) != 1 for key in ("heads", "kv_heads", "neurons")):
        return None
    candidate = copy.deepcopy(config)
    known = candidate.to_dict()
    for keys, count in ((HEAD_KEYS, structure["heads"][0]), (KV_HEAD_KEYS, structure["kv_heads"][0]),
                        (FFN_KEYS, structure["neurons"][0])):
        for key in keys:
            if key in known or key in getattr(candidate, "attribute_map", {}):
                setattr(candidate, key, count)
                break
    if "head_dim" in known:
        candidate.head_dim = head_dim
    return candidate


def auto_map(config: PretrainedConfig, module: str = MODELING_MODULE) -> dict[str, str]:
    """Every Auto class of TASKS that knows this model type -> the pruned class in the shipped file."""
    return {auto.__name__: f"{module}.{auto._model_mapping[type(config)].__name__}"
            for auto in TASKS.values() if type(config) in auto._model_mapping}


@dataclasses.dataclass
class DenseOrigin:
    """The dense model a pruned one came from: its layer shapes and prunable parameter count."""

    layers: list[LayerShape]
    prunable_params: int

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [dataclasses.asdict(s) for s in self.layers], "prunable_params": self.prunable_params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DenseOrigin":
        return cls([LayerShape(**s) for s in d["layers"]], int(d["prunable_params"]))

    @classmethod
    def of(cls, model: nn.Module) -> "DenseOrigin":
        adapter = get_adapter(model)
        return cls(shapes_of(adapter), prunable_params(adapter))


def recorded_origin(model: nn.Module) -> DenseOrigin | None:
    """The dense origin config.json carried in, when the model was loaded from a pruned export."""
    record = getattr(model.config, RECORD_KEY, None) or {}
    return DenseOrigin.from_dict(record["dense"]) if "dense" in record else None


def expresses(model: nn.Module, candidate: PretrainedConfig, dense: nn.Module) -> bool:
    """Whether the stock model of `candidate` is the pruned model: the same tensor shapes, no
    attribute pruning set that the candidate sets otherwise, per-layer config values the candidate
    holds for every layer, and the same outputs
    with the pruned weights (shared, not copied) on a few random tokens. Attributes pruning left
    stale (e.g. an MLP's intermediate_size that its forward never reads) may differ; the outputs decide."""
    twin = stock_model(model, candidate)
    diff = differences(model, twin)
    dense_modules = dict(dense.base_model.named_modules())
    touched = [k for name, changed in diff.attributes.items() for k, v in changed.items()
               if _scalars(dense_modules[name]).get(k, _MISSING) != v]
    layer_values_differ = any(getattr(candidate, k, _MISSING) != v for values in diff.configs.values()
                              for k, v in values.items())
    return not diff.parameters and not layer_values_differ and not touched and _same_outputs(model, twin)


def _same_outputs(model: nn.Module, twin: nn.Module) -> bool:
    """Give the meta-built twin the model's own tensors (its state dict, and the buffers that are
    not in it), then compare outputs on 8 random tokens."""
    state = model.state_dict(keep_vars=True)
    twin.load_state_dict(state, strict=False, assign=True)
    for name, buffer in model.named_buffers():
        if name not in state:
            owner_name, _, attr = name.rpartition(".")
            twin.get_submodule(owner_name)._buffers[attr] = buffer
    device = next(iter(state.values())).device
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    training = model.training
    try:
        with torch.no_grad():
            return torch.allclose(model.eval()(input_ids=ids)[0], twin.eval()(input_ids=ids)[0], rtol=0, atol=1e-6)
    except (RuntimeError, NotImplementedError):  # a twin tensor left on meta, or shapes that do not fit
        return False
    finally:
        model.train(training)


def sliced_parameters(model: nn.Module, config: PretrainedConfig, spec: dict[str, Any]) -> dict[str, list[int]]:
    """{name: shape} of the tensors of a sliced model whose shapes differ from what converting the
    stock model of `config` to `spec` builds (embeddings, projections, LM head, created biases)."""
    twin = stock_model(model, config)
    convert(twin, spec)
    own, ref = _shapes(model), _shapes(twin)
    dropped = sorted(set(ref) - set(own))
    if dropped:
        raise ExportError(f"tensors removed by slicing cannot be exported: {', '.join(dropped[:3])}")
    return {n: list(shape) for n, shape in own.items() if ref.get(n) != shape}


def export_config(model: nn.Module, task: str) -> tuple[PretrainedConfig, list[str]]:
    """(config to write, the modeling modules the folder must ship) for a pruned model."""
    adapter = get_adapter(model)
    structure = adapter.structure()
    config = copy.deepcopy(model.config)
    for key in (RECORD_KEY, "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    # pruning never edits the config: its stock model is the model before pruning
    origin = recorded_origin(model) or DenseOrigin.of(stock_model(model, config))
    dense = stock_model(model, config)  # a separate twin: adapters may convert the modules of the one they see
    record = {"format": FORMAT, "task": task, "structure": structure, "dense": origin.to_dict()}
    spec = getattr(model, SPEC_ATTR, None)
    if spec is not None:  # SliceGPT: its own structure, its own modeling file
        spec = {k: v for k, v in spec.items() if k != "parameters"}
        record[SLICED_KEY] = {**spec, "parameters": sliced_parameters(model, config, spec)}
        config.auto_map = auto_map(config, SLICED_MODULE)
        setattr(config, RECORD_KEY, record)
        return config, [SLICED_MODULE, MODELING_MODULE]
    diff = differences(model, dense)
    needs_code = bool(diff)
    if needs_code:
        candidate = uniform_config(config, structure, adapter.attention(adapter.layers()[0]).head_dim)
        if candidate is not None and expresses(model, candidate, dense):
            config, needs_code = candidate, False
        else:
            record.update(dataclasses.asdict(diff))
            config.auto_map = auto_map(config)
    setattr(config, RECORD_KEY, record)
    return config, [MODELING_MODULE] if needs_code else []
