"""Save a pruned model as a plain folder (safetensors, config, tokenizer, structure.json) and
load it back in one call. Per-layer head and neuron counts, and biases added by pruning, are not
expressible in a transformers config, so structure.json records them and the loader shapes the
model before loading weights."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from stat_exp.models import get_adapter
from stat_exp.models.loading import TASKS
from stat_exp.prune.surgery import resize_to

STRUCTURE_FILE = "structure.json"


def save_pruned(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path, task: str) -> None:
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    structure = {"task": task, **get_adapter(model).structure(), "added_biases": added_biases(model, task)}
    (path / STRUCTURE_FILE).write_text(json.dumps(structure, indent=1))


def added_biases(model: nn.Module, task: str) -> list[str]:
    """Modules whose bias the model's config would not create (e.g. FLAP's compensation biases)."""
    with torch.device("meta"):
        fresh = TASKS[task].from_config(model.config)
    names = {name for name, _ in fresh.named_parameters()}
    return sorted(name.removesuffix(".bias") for name, _ in model.named_parameters()
                  if name.endswith(".bias") and name not in names)


def load_pruned(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The pruned model saved by `save_pruned`, ready to run."""
    path = Path(path)
    structure = json.loads((path / STRUCTURE_FILE).read_text())
    config = AutoConfig.from_pretrained(path)
    model = TASKS[structure["task"]].from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    resize_to(get_adapter(model), structure)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or [k for k in missing if k not in tied]:
        raise ValueError(f"{path}: weights do not match the saved structure (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model.to(device).eval()
