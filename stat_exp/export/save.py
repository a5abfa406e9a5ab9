"""Save a pruned model as a folder that from_pretrained, lm-eval and stat-exp load.

The folder holds safetensors weights in the model's dtype, the tokenizer, and the config.json
that stat_exp.export.record writes (plus the shipped modeling file where layers differ). It is
written under a temporary name (`<name>.partial`) and renamed when complete, and a folder it
replaces is first renamed away whole, so an interrupted save never leaves a folder named like the
model that holds half of one, and a save that fails removes its `.partial` folder.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import cast

from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stat_exp.export.record import MODELING_MODULE, SLICED_MODULE, export_config
from stat_exp.models import modeling_stat_pruned

MODELING_FILE = f"{MODELING_MODULE}.py"
SHIPPED = Path(modeling_stat_pruned.__file__).parent  # the modeling files a folder may ship


def save_pruned(model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | Path, task: str) -> Path:
    """Write `path` (replacing it whole) and return it; `model`: a transformers model."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        cast(PreTrainedModel, model).save_pretrained(tmp)
        config, modules = export_config(model, task)
        config.save_pretrained(tmp)  # replaces the config.json save_pretrained wrote
        for ours in (MODELING_MODULE, SLICED_MODULE):  # a model loaded from a folder copies them; keep only the needed
            (tmp / f"{ours}.py").unlink(missing_ok=True)
        for module in modules:
            shutil.copyfile(SHIPPED / f"{module}.py", tmp / f"{module}.py")
        tokenizer.save_pretrained(tmp)
    except BaseException:  # a failed save leaves nothing behind, not half a model
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replaced = path.with_name(path.name + ".replaced")  # an old folder leaves whole, by rename
    shutil.rmtree(replaced, ignore_errors=True)
    if path.exists():
        path.rename(replaced)
    tmp.rename(path)
    shutil.rmtree(replaced, ignore_errors=True)
    return path
