"""Turn an encoder into a task model (the command line: `python -m stat_exp.finetune`).

No GLUE-fine-tuned encoder ships offline, so this makes one: AdamW with linear warmup/decay for a
few epochs on a task's training split (any GLUE task, from the hub or `--data-dir`; `pang_lee`
is embedded), then the task's metrics on its evaluation split. The output is a plain folder
(AutoModelForSequenceClassification + tokenizer + finetune.json) written under a temporary name
and renamed into place, so a folder that exists is complete.
`ensure_polarity_model()` prepares the embedded sentiment model `minilm_l6_polarity` once.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from stat_exp import assets
from stat_exp.data.glue import encode_batches, get_task, label_tensor, load_split
from stat_exp.errors import UserError
from stat_exp.eval.glue import GlueEval
from stat_exp.models.loading import resolve_source

POLARITY_MODEL = "minilm_l6_polarity"
INFO_FILE = "finetune.json"


@dataclass(frozen=True)
class Recipe:
    """What a fine-tuning run does; saved next to the weights."""

    model: str = "minilm_l6"
    task: str = "pang_lee"
    data_dir: str | None = None
    epochs: int = 8
    lr: float = 1e-4
    batch_size: int = 16
    max_length: int = 128
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of the steps with a linearly rising learning rate
    freeze_embeddings: bool = True  # the vocabulary matrix is half of a small encoder: skip its updates
    seed: int = 0


def train(recipe: Recipe, device: torch.device, progress: bool = True):
    """The fine-tuned model (eval mode) and its tokenizer."""
    spec = get_task(recipe.task)
    torch.manual_seed(recipe.seed)
    path = resolve_source(recipe.model)
    labels = dict(enumerate(spec.label_names)) if spec.label_names else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=spec.num_labels, id2label=labels,
            label2id={v: k for k, v in labels.items()} if labels else None, dtype=torch.float32).to(device)
    except OSError as err:
        raise UserError(f"cannot load model {recipe.model!r}: {str(err).splitlines()[0]}") from err
    if recipe.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    rows = load_split(spec, "train", recipe.data_dir)
    steps_per_epoch = math.ceil(len(rows) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(recipe.warmup * total), total)
    order = torch.Generator().manual_seed(recipe.seed)
    model.train()
    with tqdm(total=total, desc=f"fine-tune {spec.name}", disable=not progress) as bar:
        for _ in range(recipe.epochs):
            shuffled = [rows[i] for i in torch.randperm(len(rows), generator=order).tolist()]
            batches = encode_batches(tokenizer, spec, shuffled, recipe.max_length, recipe.batch_size)
            for start, batch in zip(range(0, len(shuffled), recipe.batch_size), batches):
                chunk = shuffled[start:start + recipe.batch_size]
                target = label_tensor(spec, chunk)
                loss = model(**{k: v.to(device) for k, v in batch.items()}, labels=target.to(device)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    return model.eval(), tokenizer


def finetune(recipe: Recipe, out: str | Path, device: torch.device | str = "cpu", overwrite: bool = False,
             progress: bool = True) -> dict[str, float]:
    """Train, evaluate and save to `out`; returns the evaluation metrics.

    Without `overwrite` an existing `out` is kept (and wins a race with a concurrent run).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    device = torch.device(device)
    model, tokenizer = train(recipe, device, progress)
    metrics = GlueEval(recipe.task, recipe.data_dir, recipe.max_length, progress=progress)(model, tokenizer, device)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps({"recipe": asdict(recipe), "metrics": metrics}, indent=1))
        if overwrite:
            shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / INFO_FILE).is_file():  # only a complete concurrent result may stand in
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def polarity_model_path() -> Path:
    return assets.cache_dir() / "models" / POLARITY_MODEL


def ensure_polarity_model(progress: bool = True) -> Path:
    """The embedded sentiment model: minilm_l6 fine-tuned on the 150 Pang & Lee training
    sentences (seconds on a CPU), prepared once; held-out accuracy is in its finetune.json."""
    out = polarity_model_path()
    if not (out / INFO_FILE).is_file():
        with assets.preparation_lock(out):
            if not (out / INFO_FILE).is_file():  # another process may have finished it meanwhile
                finetune(Recipe(), out, progress=progress)
    return out
