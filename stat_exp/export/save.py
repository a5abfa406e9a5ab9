"""Save a pruned model as a folder that from_pretrained, lm-eval and stat-exp load.

The folder holds safetensors weights in the model's dtype, the tokenizer, and the config.json
that stat_exp.export.record writes (plus the shipped modeling file where layers differ). It is
written under a temporary name (`<name>.partial`) and renamed when complete, and a folder it
replaces is first renamed away whole, so an interrupted save never leaves a folder named like the
model that holds half of one.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from stat_exp.export.record import MODELING_MODULE, export_config
from stat_exp.models import modeling_stat_pruned

MODELING_FILE = f"{MODELING_MODULE}.py"


def save_pruned(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | Path, task: str) -> Path:
    """Write `path` (replacing it whole) and return it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    config, needs_code = export_config(model, task)
    config.save_pretrained(tmp)  # replaces the config.json save_pretrained wrote
    (tmp / MODELING_FILE).unlink(missing_ok=True)  # a remote-code model copies its own; keep ours only if needed
    if needs_code:
        shutil.copyfile(modeling_stat_pruned.__file__, tmp / MODELING_FILE)
    tokenizer.save_pretrained(tmp)
    replaced = path.with_name(path.name + ".replaced")  # an old folder leaves whole, by rename
    shutil.rmtree(replaced, ignore_errors=True)
    if path.exists():
        path.rename(replaced)
    tmp.rename(path)
    shutil.rmtree(replaced, ignore_errors=True)
    return path
