"""GLUE-style sentence(-pair) tasks as data: task specs, split loading, padded batches.

A split comes from, in this order: a local folder (`data_dir`) with `<split>.jsonl` or `<split>.tsv`
in the hub dataset's columns (TSV: a header row, tab-separated, no quoting); an embedded task
(`pang_lee`: the 200 Pang & Lee sentences, split 150/50 once and for all); or the hub dataset
`nyu-mll/glue` when online. Rows are normalised to the task's text columns and a numeric "label"
(label names such as "entailment" are accepted in local files).
"""
from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from stat_exp.assets import AssetError, corpus_path
from stat_exp.data.base import Calibration
from stat_exp.data.calib_size import (AUTO, SAMPLE_EXAMPLES, NumExamples, examples_for_tokens, real_tokens,
                                      resolved)
from stat_exp.data.text import DataError
from stat_exp.errors import ConfigError
from stat_exp.types import LABELS, PositiveInt, Propagate, Seed

HUB_DATASET = "nyu-mll/glue"
LOCAL_FORMATS = (".jsonl", ".tsv")
TEXT_ALIAS = "text"  # single-sentence files may name their column "text" instead of "sentence"

Row = dict[str, str | int | float]


@dataclass(frozen=True)
class GlueTask:
    """One task: its text columns, label space, official metrics and evaluation splits."""

    name: str
    text_keys: tuple[str, ...]
    num_labels: int  # 1: regression
    metrics: tuple[str, ...]  # names in stat_exp.eval.glue.METRICS
    eval_splits: tuple[str, ...] = ("validation",)
    label_names: tuple[str, ...] = ()  # the hub's class names, in label order
    embedded: Callable[[str], list[Row]] | None = None  # rows of a split without hub or files

    @property
    def regression(self) -> bool:
        return self.num_labels == 1

    def splits(self) -> tuple[str, ...]:
        return ("train", *self.eval_splits)


PANG_LEE_HELD_OUT = 25  # per class: 50 of the 200 sentences are held out, 150 train
_PANG_LEE_SEED = 0


def _pang_lee_rows(split: str) -> list[Row]:
    """A fixed, class-balanced split of the embedded Pang & Lee polarity sentences."""
    try:
        path = corpus_path("pang_lee")
    except AssetError as err:
        raise DataError(f"embedded task 'pang_lee' unavailable: {err}") from None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    held_out: set[int] = set()
    for label in sorted({r["label"] for r in rows}):
        members = [i for i, r in enumerate(rows) if r["label"] == label]
        random.Random(f"{_PANG_LEE_SEED}:{label}").shuffle(members)
        held_out.update(members[:PANG_LEE_HELD_OUT])
    wanted = split == "validation"
    return [{"sentence": r["text"], "label": r["label"]} for i, r in enumerate(rows) if (i in held_out) == wanted]


TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", ("sentence",), 2, ("matthews",), label_names=("unacceptable", "acceptable")),
    GlueTask("sst2", ("sentence",), 2, ("accuracy",), label_names=("negative", "positive")),
    GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("f1", "accuracy"), label_names=("not_equivalent", "equivalent")),
    GlueTask("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearman")),
    GlueTask("qqp", ("question1", "question2"), 2, ("f1", "accuracy"), label_names=("not_duplicate", "duplicate")),
    GlueTask("mnli", ("premise", "hypothesis"), 3, ("accuracy",), ("validation_matched", "validation_mismatched"),
             ("entailment", "neutral", "contradiction")),
    GlueTask("qnli", ("question", "sentence"), 2, ("accuracy",), label_names=("entailment", "not_entailment")),
    GlueTask("rte", ("sentence1", "sentence2"), 2, ("accuracy",), label_names=("entailment", "not_entailment")),
    GlueTask("pang_lee", ("sentence",), 2, ("accuracy",), label_names=("negative", "positive"),
             embedded=_pang_lee_rows),
)}


def get_task(task: str | GlueTask | None) -> GlueTask:
    if isinstance(task, GlueTask):
        return task
    if task not in TASKS:
        raise ConfigError(f"unknown GLUE task {task!r}; valid: {', '.join(TASKS)}")
    return TASKS[task]


def load_split(task: str | GlueTask, split: str, data_dir: str | Path | None = None,
               num_examples: int | None = None, seed: int = 0) -> list[Row]:
    """Normalised rows of one split; with `num_examples`, a seeded random subset of that size
    (the whole split when it is smaller)."""
    spec = get_task(task)
    if split not in spec.splits():
        raise ConfigError(f"task {spec.name} has no split {split!r}; valid: {', '.join(spec.splits())}")
    if data_dir is not None:
        rows, where = _read_local(Path(data_dir).expanduser(), split), f"{data_dir}/{split}"
        rows = _subset(rows, num_examples, seed)
    elif spec.embedded is not None:
        rows, where = _subset(spec.embedded(split), num_examples, seed), f"embedded {spec.name}/{split}"
    else:
        rows, where = _read_hub(spec, split, num_examples, seed), f"{HUB_DATASET}/{spec.name}/{split}"
    if not rows:
        raise DataError(f"{where} is empty")
    return [_normalise(row, spec, where, n) for n, row in enumerate(rows, start=1)]


def _subset(rows: list, num_examples: int | None, seed: int) -> list:
    if num_examples is None or num_examples >= len(rows):
        return rows
    return [rows[i] for i in _sample(len(rows), num_examples, seed)]


def drawn_with_replacement(total: int, num: int, seed: int) -> list[int]:
    """The indices the released scripts draw: numpy's legacy generator seeded with `seed`, `num`
    uniform draws from range(total), duplicates kept, in the order drawn."""
    return np.random.RandomState(seed).choice(total, num).tolist()


def _sample(total: int, num: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(total), num))


def local_split(folder: Path, split: str) -> Path:
    """The file of a split in a local folder (`<split>.jsonl` or `<split>.tsv`); DataError when none."""
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    for suffix in LOCAL_FORMATS:
        path = folder / f"{split}{suffix}"
        if path.is_file():
            return path
    raise DataError(f"no {split}.jsonl or {split}.tsv in {folder}")


def _read_local(folder: Path, split: str) -> list[dict]:
    path = local_split(folder, split)
    return _read_jsonl(path) if path.suffix == ".jsonl" else _read_tsv(path)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return rows


def _read_tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def _read_hub(spec: GlueTask, split: str, num_examples: int | None, seed: int) -> list[dict]:
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        data = datasets.load_dataset(HUB_DATASET, spec.name, split=split)
    except Exception as err:  # noqa: BLE001 - hub/IO errors come in many types; report one line
        from datasets.config import HF_DATASETS_OFFLINE

        reason = ("offline and not in the local cache" if HF_DATASETS_OFFLINE
                  else f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
        raise DataError(f"cannot load {HUB_DATASET}/{spec.name} split {split}: {reason} "
                        f"(or give a folder with {split}.jsonl/.tsv as data_dir)") from None
    if num_examples is not None and num_examples < len(data):
        data = data.select(_sample(len(data), num_examples, seed))
    return list(data)


def _normalise(row: dict, spec: GlueTask, where: str, number: int) -> Row:
    out: Row = {}
    for key in spec.text_keys:
        value = row.get(key, row.get(TEXT_ALIAS) if len(spec.text_keys) == 1 else None)
        if not isinstance(value, str):
            raise DataError(f"{where} row {number}: missing text column {key!r} (columns: {', '.join(row)})")
        out[key] = value
    out["label"] = _label(row.get("label"), spec, f"{where} row {number}")
    return out


def _label(value, spec: GlueTask, where: str) -> int | float:
    if isinstance(value, str) and value in spec.label_names:
        return spec.label_names.index(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {value!r} is not a number"
                        + (f" or one of {', '.join(spec.label_names)}" if spec.label_names else "")) from None
    if spec.regression:
        return number
    if number != int(number) or not 0 <= number < spec.num_labels:
        raise DataError(f"{where}: label {value!r} outside 0..{spec.num_labels - 1} (test splits carry no labels)")
    return int(number)


def encode_batches(tokenizer: PreTrainedTokenizerBase, spec: GlueTask, rows: list[Row], max_length: int,
                   batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Model inputs in row order, each batch padded to its own longest example (the attention mask
    marks the padding; token_type_ids come along when the tokenizer makes them)."""
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        texts = [[r[k] for r in chunk] for k in spec.text_keys]
        batches.append(dict(tokenizer(*texts, padding=True, truncation=True, max_length=max_length,
                                      return_tensors="pt")))
    return batches


def label_tensor(spec: GlueTask, rows: list[Row]) -> torch.Tensor:
    """The rows' labels as a model's `labels` argument expects them (float for regression)."""
    return torch.tensor([r["label"] for r in rows], dtype=torch.float32 if spec.regression else torch.long)


@dataclass
class GlueCalibration(Calibration):
    """Calibration from a task's training split: `num_examples` random examples (the paper: 512),
    tokenized like the task's inputs and padded per batch, with their labels (`pruner=kwon` takes
    its Fisher information from the task loss, as in the paper; the layer stream ignores them).
    `num_examples=auto` follows the model (stat_exp.data.calib_size)."""

    task: str | None
    data_dir: str | None = None
    num_examples: NumExamples = AUTO
    max_length: PositiveInt = 128
    batch_size: PositiveInt = 32
    seed: Seed = 0
    propagate: Propagate = "dense"
    # True: drawn with replacement in the order drawn, as the released prune_bert.py (and Kwon et al.'s
    # main.py) draw them: np.random.seed(seed); np.random.choice(len(train), num_examples)
    with_replacement: bool = False

    def __post_init__(self) -> None:
        if self.task is None:
            raise ConfigError(f"calib=glue needs a task (calib.task or eval.task); valid: {', '.join(TASKS)}")
        get_task(self.task)

    @property
    def longest_sequence(self) -> int:
        return self.max_length

    @property
    def available_examples(self) -> int | None:
        """The training split's size where it is read without the hub (a draw with replacement is
        not bounded by it)."""
        if self.with_replacement or (self.data_dir is None and get_task(self.task).embedded is None):
            return None
        return len(load_split(get_task(self.task), "train", self.data_dir))

    def check(self) -> None:
        if self.data_dir is not None:
            local_split(Path(self.data_dir).expanduser(), "train")

    def batches(self, tokenizer: PreTrainedTokenizerBase, num_examples: int | None = None) -> list[dict[str, torch.Tensor]]:
        """The calibration batches; `num_examples` overrides the configured count (a pruner's own draw)."""
        spec = get_task(self.task)
        count = num_examples or resolved(self.num_examples)
        if self.with_replacement:
            rows = load_split(spec, "train", self.data_dir, None, self.seed)
            rows = [rows[i] for i in drawn_with_replacement(len(rows), count, self.seed)]
        else:
            rows = load_split(spec, "train", self.data_dir, count, self.seed)
        batches = encode_batches(tokenizer, spec, rows, self.max_length, self.batch_size)
        for start, batch in zip(range(0, len(rows), self.batch_size), batches):
            batch[LABELS] = label_tensor(spec, rows[start:start + self.batch_size])  # for loss-based pruners
        return batches

    def examples_for(self, tokenizer: PreTrainedTokenizerBase, tokens: int) -> int:
        """How many training examples hold `tokens` real tokens (from the mean of a seeded sample)."""
        spec = get_task(self.task)
        sample = load_split(spec, "train", self.data_dir, SAMPLE_EXAMPLES, self.seed)
        held = real_tokens(encode_batches(tokenizer, spec, sample, self.max_length, self.batch_size))
        return examples_for_tokens(held, len(sample), tokens)
