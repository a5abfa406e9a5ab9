"""Load a model and its tokenizer from an embedded asset name, a local folder or a hub id."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from stat_exp import assets
from stat_exp.errors import ConfigError, UserError

TASKS = {
    "causal_lm": AutoModelForCausalLM,
    "encoder": AutoModel,
    "sequence_classification": AutoModelForSequenceClassification,
    "question_answering": AutoModelForQuestionAnswering,
}
DTYPES = ("float32", "float16", "bfloat16")


def resolve_source(source: str) -> str:
    """Embedded asset name -> its folder; a local path stays; anything else is a hub id."""
    return str(assets.model_path(source)) if source in assets.model_names() else source


def load_model(source: str, task: str = "causal_lm", dtype: str = "float32",
               device: torch.device | str = "cpu", attn_implementation: str | None = None,
               model_class: type | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model (eval mode, on `device`) and its tokenizer. `attn_implementation` None lets
    transformers choose: SDPA where the architecture supports it, else eager (Gemma 2).
    `model_class`: the class to load with instead of the task's Auto class."""
    if task not in TASKS:
        raise ConfigError(f"model.task={task!r}; allowed: {', '.join(TASKS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    path = resolve_source(source)
    local = Path(path).exists()
    if not local and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"model {source!r} is neither an embedded model ({', '.join(assets.model_names())}) nor a "
                        f"local folder, and the hub is offline (HF_HUB_OFFLINE=1)")
    kwargs = {"dtype": getattr(torch, dtype)}
    if torch.device(device).type != "cpu":  # straight to the device: no host copy of the weights
        kwargs["device_map"] = str(device)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = (model_class or TASKS[task]).from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load model {source!r}: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
