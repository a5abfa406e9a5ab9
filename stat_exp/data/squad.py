"""SQuAD v1.1 / v2.0 as data: questions from the hub or from a local file in the official JSON
format, and the features a question-answering model reads (question + a window of the context).

Contexts longer than `max_length` are cut into windows that overlap by `doc_stride` tokens, as in
the reference fine-tuning scripts (and Kwon et al.'s); every window of a question is one feature.
Training features carry the answer's token span (the [CLS] position when the answer is not inside
the window or the question has none).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from stat_exp.data.base import Calibration
from stat_exp.data.calib_size import (AUTO, SAMPLE_EXAMPLES, NumExamples, examples_for_tokens, real_tokens,
                                      resolved)
from stat_exp.data.text import DataError
from stat_exp.errors import ConfigError
from stat_exp.types import LABELS, NonNegativeInt, PositiveInt, Propagate, Seed, SquadVersion
from stat_exp.types import SQUAD_VERSIONS as VERSIONS

HUB_DATASETS = {"1.1": "rajpurkar/squad", "2.0": "rajpurkar/squad_v2"}
SPLITS = ("train", "validation")
FORMAT = ('{"data": [{"paragraphs": [{"context": str, "qas": [{"id": str, "question": str, '
          '"answers": [{"text": str, "answer_start": int}]}]}]}]}')


@dataclass(frozen=True)
class SquadExample:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]  # gold answer texts; empty: unanswerable (v2.0)
    starts: tuple[int, ...]  # character offsets of the answers in the context


@dataclass
class Features:
    """Tokenized windows: model inputs in batches, and per window its question and context offsets."""

    batches: list[dict[str, torch.Tensor]]
    example: list[int] = field(default_factory=list)  # window -> index of its question
    offsets: list[list[tuple[int, int] | None]] = field(default_factory=list)  # None outside the context


def check_version(version: str, key: str) -> str:
    version = str(version)
    if version not in VERSIONS:
        raise ConfigError(f"{key}={version!r}; allowed: {', '.join(VERSIONS)}")
    return version


def load_examples(version: str, split: str, data_file: str | None = None, num_examples: int | None = None,
                  seed: int = 0) -> list[SquadExample]:
    """The questions of a split (a seeded random subset of `num_examples`): from `data_file` in the
    official JSON format, else from the hub dataset of that version."""
    if data_file is not None:
        examples = read_squad_json(Path(data_file).expanduser())
    else:
        examples = _read_hub(version, split)
    if not examples:
        raise DataError(f"SQuAD {split} data ({data_file or HUB_DATASETS[version]}) has no questions")
    if num_examples is not None and num_examples < len(examples):
        examples = [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), num_examples))]
    return examples


def check_squad_file(path: Path) -> None:
    """A SQuAD file that exists and can be read (its format is checked when it is read)."""
    if not path.is_file():
        raise DataError(f"SQuAD file not found: {path}")
    if not os.access(path, os.R_OK):
        raise DataError(f"SQuAD file cannot be read: {path}")


def read_squad_json(path: Path) -> list[SquadExample]:
    """Questions of a file in the official SQuAD format; one DataError line naming what is wrong."""
    check_squad_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not JSON ({err}); expected the SQuAD format {FORMAT}") from None

    def bad(where: str) -> DataError:
        return DataError(f"{path}: not in the SQuAD format ({where}); expected {FORMAT}")

    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise bad('no top-level "data" list')
    examples = []
    for a, article in enumerate(data["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise bad(f'data[{a}] has no "paragraphs" list')
        for p, par in enumerate(paragraphs):
            where = f"data[{a}].paragraphs[{p}]"
            if not isinstance(par, dict) or not isinstance(par.get("context"), str) or not isinstance(par.get("qas"), list):
                raise bad(f'{where} needs a "context" string and a "qas" list')
            for q, qa in enumerate(par["qas"]):
                answers = qa.get("answers") if isinstance(qa, dict) else None
                if (not isinstance(answers, list) or not isinstance(qa.get("question"), str)
                        or not isinstance(qa.get("id"), (str, int))):
                    raise bad(f'{where}.qas[{q}] needs "id", "question" and an "answers" list')
                if not all(isinstance(x, dict) and isinstance(x.get("text"), str) and isinstance(x.get("answer_start"), int)
                           for x in answers):
                    raise bad(f'{where}.qas[{q}].answers: each needs "text" and an integer "answer_start"')
                examples.append(SquadExample(str(qa["id"]), qa["question"], par["context"],
                                             tuple(x["text"] for x in answers), tuple(x["answer_start"] for x in answers)))
    return examples


def _read_hub(version: str, split: str) -> list[SquadExample]:
    name = HUB_DATASETS[version]
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        data = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - hub/IO errors come in many types; report one line
        from datasets.config import HF_DATASETS_OFFLINE

        reason = ("offline and not in the local cache" if HF_DATASETS_OFFLINE
                  else f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
        raise DataError(f"cannot load {name} split {split}: {reason} (or give a local file in the SQuAD JSON "
                        f"format as data_file)") from None
    return [SquadExample(str(r["id"]), r["question"], r["context"], tuple(r["answers"]["text"]),
                         tuple(r["answers"]["answer_start"])) for r in data]


def encode(tokenizer: PreTrainedTokenizerBase, examples: list[SquadExample], max_length: int, doc_stride: int,
           batch_size: int, labels: bool = False) -> Features:
    """Windows of every question's context, padded per batch; with `labels`, each batch's answer
    spans under LABELS as the model's loss arguments (start_positions, end_positions)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("SQuAD needs a fast tokenizer (offsets into the context); this model's is not")
    if not 0 <= doc_stride < max_length:
        raise ConfigError(f"doc_stride={doc_stride} must be in [0, max_length={max_length})")
    enc = tokenizer([e.question.lstrip() for e in examples], [e.context for e in examples], truncation="only_second",
                    max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                    return_offsets_mapping=True, padding=False)
    features = Features(batches=[], example=list(enc["overflow_to_sample_mapping"]))
    spans = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        in_context = [s == 1 for s in enc.sequence_ids(i)]
        features.offsets.append([tuple(o) if c else None for o, c in zip(offsets, in_context)])
        if labels:
            spans.append(_answer_span(examples[features.example[i]], features.offsets[-1],
                                      enc["input_ids"][i].index(tokenizer.cls_token_id)))
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    for start in range(0, len(features.example), batch_size):
        chunk = {k: enc[k][start:start + batch_size] for k in keys}
        batch = dict(tokenizer.pad(chunk, return_tensors="pt"))
        if labels:
            span = torch.tensor(spans[start:start + batch_size])
            batch[LABELS] = {"start_positions": span[:, 0], "end_positions": span[:, 1]}
        features.batches.append(batch)
    return features


def _answer_span(example: SquadExample, offsets: list[tuple[int, int] | None], cls: int) -> tuple[int, int]:
    """Token positions of the first gold answer inside this window, or (cls, cls)."""
    if not example.answers:
        return cls, cls
    start_char = example.starts[0]
    end_char = start_char + len(example.answers[0])
    inside = [i for i, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
        return cls, cls
    start = max(i for i in inside if offsets[i][0] <= start_char)
    end = min(i for i in inside if offsets[i][1] >= end_char)
    return start, end


@dataclass
class SquadCalibration(Calibration):
    """Calibration on SQuAD training questions (`calib=squad`): `num_examples` random questions, every
    window of their contexts, with their answer spans (`pruner=kwon` takes its Fisher information
    from the QA loss; the layer stream ignores them). `num_examples=auto` follows the model
    (stat_exp.data.calib_size)."""

    version: SquadVersion = "1.1"
    data_file: str | None = None
    num_examples: NumExamples = AUTO
    max_length: PositiveInt = 384
    doc_stride: NonNegativeInt = 128
    batch_size: PositiveInt = 32
    seed: Seed = 0
    propagate: Propagate = "dense"

    def __post_init__(self) -> None:
        self.version = check_version(self.version, "calib.version")

    @property
    def longest_sequence(self) -> int:
        return self.max_length

    def check(self) -> None:
        if self.data_file is not None:
            check_squad_file(Path(self.data_file).expanduser())

    def batches(self, tokenizer: PreTrainedTokenizerBase, num_examples: int | None = None) -> list[dict[str, torch.Tensor]]:
        """The calibration batches; `num_examples` overrides the configured count (a pruner's own draw,
        or the count `auto` resolved to)."""
        examples = load_examples(self.version, "train", self.data_file, num_examples or resolved(self.num_examples),
                                 self.seed)
        return encode(tokenizer, examples, self.max_length, self.doc_stride, self.batch_size, labels=True).batches

    def examples_for(self, tokenizer: PreTrainedTokenizerBase, tokens: int) -> int:
        """How many questions hold `tokens` real tokens over all their windows (from a seeded sample)."""
        sample = load_examples(self.version, "train", self.data_file, SAMPLE_EXAMPLES, self.seed)
        held = real_tokens(encode(tokenizer, sample, self.max_length, self.doc_stride, self.batch_size).batches)
        return examples_for_tokens(held, len(sample), tokens)
