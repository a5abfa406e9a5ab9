"""Load a saved model folder: checked first (one line naming the folder and the problem, never a
half-loaded model), then built with the same pruned classes the folder ships, so stat-exp runs
none of the folder's code."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from stat_exp.errors import ConfigError, UserError
from stat_exp.models import get_adapter
from stat_exp.models.loading import TASKS
from stat_exp.models.loading import load_model as load_stock_model
from stat_exp.models.modeling_sliced import SLICED_KEY, sliced_class
from stat_exp.models.modeling_stat_pruned import RECORD_KEY, pruned_class

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(UserError):
    """A model folder that cannot be loaded as it is."""


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_config(path: Path) -> PretrainedConfig:
    """The folder's config, or one line saying why the folder is not a model."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a model folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: config.json cannot be read: {_first_line(e)}") from None


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """{tensor name: shape} from the safetensors headers (no data read); None for non-safetensors folders.
    A truncated or corrupt file fails here, before any weight loads."""
    if (path / INDEX_FILE).is_file():
        try:
            files = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path}: {INDEX_FILE} cannot be read ({_first_line(e)})") from None
    elif (path / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        return None
    shapes = {}
    for name in files:
        try:
            with safe_open(path / name, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: {name} is missing") from None
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: {name} is truncated or corrupt ({_first_line(e)})") from None
    return shapes


def model_class(config: PretrainedConfig, task: str) -> type[PreTrainedModel]:
    """The class that builds this folder's model for `task`: the stock class, pruned as recorded."""
    if task not in TASKS:
        raise ConfigError(f"model.task={task!r}; allowed: {', '.join(TASKS)}")
    mapping: Any = TASKS[task]._model_mapping
    if type(config) not in mapping:
        raise CheckpointError(f"model type {config.model_type!r} has no {TASKS[task].__name__} (model.task={task})")
    record = getattr(config, RECORD_KEY, None) or {}
    stock = mapping[type(config)]
    if SLICED_KEY in record:
        return sliced_class(stock)
    return pruned_class(stock) if any(record.get(k) for k in ("parameters", "attributes", "configs")) else stock


def _by_base_name(names_shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    """Names relative to the base model: a task model's "model.layers.0..." and a bare model's
    "layers.0..." compare equal; task-head names keep their own."""
    return {k.removeprefix(prefix + "."): v for k, v in names_shapes.items()}


def check_folder(path: str | Path, task: str, weights: bool = True) -> tuple[PretrainedConfig, type[PreTrainedModel]]:
    """(config, class to load with) after checking that config.json and the weights agree: the
    shapes of every tensor both name, and, for a stat-exp export, that no base-model weight is
    missing or extra and the per-layer structure matches the recorded shapes. `weights=False`: a
    folder of config.json alone passes (the planner sizes a model from its config)."""
    path = Path(path)
    config = read_config(path)
    cls = model_class(config, task)
    saved = weight_shapes(path)
    if saved is None:
        if weights and not any(path.glob("*.bin")):
            raise CheckpointError(f"{path}: no weights ({WEIGHTS_FILE})")
        return config, cls
    record = getattr(config, RECORD_KEY, None) or {}
    try:
        with torch.device("meta"):
            skeleton = cls(config)
    except (ValueError, AttributeError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: config.json does not describe a {cls.__name__}: {_first_line(e)}") from None
    prefix = skeleton.base_model_prefix
    saved = _by_base_name(saved, prefix)
    built = _by_base_name({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, prefix)
    base = set(skeleton.base_model.state_dict()) if record else set()
    contradiction = f"{path}: config.json's structure contradicts the weights:"
    for name in sorted(base | (set(saved) & set(built))):
        if name not in saved:
            raise CheckpointError(f"{contradiction} {name} is missing from the weights")
        if saved[name] != built[name]:
            raise CheckpointError(f"{contradiction} {name} is {list(saved[name])} in the weights, "
                                  f"{list(built[name])} by config.json")
    roots = {name.split(".")[0] for name in base}
    extra = sorted(k for k in saved if k not in built and k.split(".")[0] in roots)
    if extra:
        raise CheckpointError(f"{contradiction} {extra[0]} is in the weights, not in the model config.json describes")
    if "structure" in record and get_adapter(skeleton).structure() != record["structure"]:
        raise CheckpointError(f"{path}: config.json's per-layer structure contradicts its recorded parameter shapes")
    return config, cls


def load_model(source: str, task: str = "causal_lm", dtype: str = "float32", device: torch.device | str = "cpu",
               attn_implementation: str | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """`model.source`: a local folder is checked and loaded with its recorded structure (a pruned
    export or a plain checkpoint); embedded names and hub ids load as usual."""
    if not Path(source).is_dir():
        return load_stock_model(source, task, dtype, device, attn_implementation)
    _, cls = check_folder(source, task)
    return load_stock_model(source, task, dtype, device, attn_implementation, model_class=cls)


def load_pruned(path: str | Path, device: torch.device | str = "cpu", task: str | None = None) -> nn.Module:
    """The model saved by `save_pruned`, in its saved dtype, with its task head, ready to run."""
    config = read_config(Path(path))
    task = task or (getattr(config, RECORD_KEY, None) or {}).get("task", "causal_lm")
    config, cls = check_folder(path, task)
    model: nn.Module = cls.from_pretrained(path, config=config, dtype=getattr(config, "dtype", None) or torch.float32)
    return model.to(device).eval()
