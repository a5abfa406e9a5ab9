"""Offline lm-eval tasks built from the embedded corpora: stat_analogies, stat_lastword,
stat_pang_lee, stat_wiki_ppl.

Each task is a YAML file next to this module (tasks as data); its ``data_files`` name a bare file
that a builder here writes from stat_exp.assets into ``<cache>/lm_eval/``. lm-eval resolves relative
data paths against the working directory, so prepare_tasks() also writes copies of the YAMLs with
absolute paths into ``<cache>/lm_eval/tasks/``: that folder works with
TaskManager(include_path=...) and with the lm_eval CLI's --include_path.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import yaml

from stat_exp.assets import cache_dir, corpus_path
from stat_exp.errors import UserError

TEMPLATE_DIR = Path(__file__).parent
TASK_NAMES: tuple[str, ...] = tuple(sorted(p.stem for p in TEMPLATE_DIR.glob("stat_*.yaml")))

ANALOGY_ROWS = 1000  # of 19,544: enough to separate models, cheap to score
ANALOGY_DISTRACTORS = 3
LASTWORD_ROWS = 500
PASSAGE_WORDS = 50  # a passage closes at the first sentence end past this many words (LAMBADA: ~75)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_TARGET_WORD = re.compile(r"[A-Za-z]{3,}")  # no numbers, no "Dr"/"St" abbreviations cut at a period


def task_dir() -> Path:
    """Where the prepared data and the resolved task YAMLs live."""
    return cache_dir() / "lm_eval"


def prepare_tasks(names: Iterable[str]) -> Path:
    """Build the data of these tasks and write their resolved YAMLs; return the include_path folder."""
    names = list(names)
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown:
        raise UserError(f"unknown offline lm_eval task '{unknown[0]}'; offline tasks: {', '.join(TASK_NAMES)}")
    root = task_dir()
    (root / "tasks").mkdir(parents=True, exist_ok=True)
    for name in names:
        config = yaml.safe_load((TEMPLATE_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
        files = config["dataset_kwargs"]["data_files"]
        for split, filename in files.items():
            write_atomic(root / filename, _jsonl(_BUILDERS[filename]()))
            files[split] = str(root / filename)
        header = f"# Generated from stat_exp/eval/tasks/{name}.yaml with absolute data paths; do not edit.\n"
        write_atomic(root / "tasks" / f"{name}.yaml", header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return root / "tasks"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary sibling and a rename, and only on change: concurrent jobs write the
    same bytes, readers never see half a file, and an unchanged file keeps its datasets cache."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _digest(*parts: object) -> int:
    """A stable hash (independent of PYTHONHASHSEED) for sampling and seeding."""
    return int(hashlib.sha256(json.dumps(["stat-exp/lm_eval/v1", *parts]).encode()).hexdigest(), 16)


def _shuffled(rows: list[dict], name: str, n: int | None = None) -> list[dict]:
    """The rows (the first n) in a fixed pseudo-random order, so that lm-eval's `limit`, which
    takes the first documents, gets a representative sample rather than one label or category."""
    return sorted(rows, key=lambda row: _digest(name, row))[:n]


# ----------------------------------------------------------------------------- builders


def wiki_documents() -> list[dict]:
    """{"text"}: one document per article of the wiki evaluation split."""
    articles = corpus_path("wiki_eval").read_text(encoding="utf-8").strip().split("\n\n")
    return [{"text": article} for article in articles]


def pang_lee_reviews() -> list[dict]:
    """{"text", "label"}: the 200 review sentences (1 positive, 0 negative), shuffled."""
    return _shuffled(_read_jsonl(corpus_path("pang_lee")), "pang_lee")


def analogy_questions() -> list[dict]:
    """{"category", "a", "b", "c", "d", "choices", "gold"}: a fixed shuffled subsample, as 4-way cloze.

    Distractors are other answers (d-words) of the same category, so every choice has the right
    type (a country, a past tense, ...); they are drawn and shuffled with a seed hashed from the row.
    """
    rows = _read_jsonl(corpus_path("analogies"))
    answers: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        answers[row["category"]].add(row["d"])
    return [_cloze(row, answers[row["category"]]) for row in _shuffled(rows, "analogies", ANALOGY_ROWS)]


def _cloze(row: dict, answers: set[str]) -> dict:
    rng = random.Random(_digest("cloze", row))
    pool = sorted(answers - {row["a"], row["b"], row["c"], row["d"]})
    choices = rng.sample(pool, ANALOGY_DISTRACTORS) + [row["d"]]
    rng.shuffle(choices)
    return {**row, "choices": choices, "gold": choices.index(row["d"])}


def lastword_passages() -> list[dict]:
    """{"context", "word"}: passages of whole sentences from the wiki evaluation split; the target
    is the final word (period dropped, as in LAMBADA), and the context is everything before it."""
    text = corpus_path("wiki_eval").read_text(encoding="utf-8")
    paragraphs = [line for line in text.splitlines() if line.strip() and not line.startswith("=")]
    rows = [row for p in paragraphs for row in map(_lastword_row, _passages(p)) if row]
    return _shuffled(rows, "lastword", LASTWORD_ROWS)


def _passages(paragraph: str) -> Iterator[str]:
    """Consecutive sentences, closed at the first sentence end past PASSAGE_WORDS words."""
    sentences: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        sentences.append(sentence)
        if sum(len(s.split()) for s in sentences) >= PASSAGE_WORDS:
            yield " ".join(sentences)
            sentences = []


def _lastword_row(passage: str) -> dict | None:
    context, _, last = passage.rpartition(" ")
    word = last.removesuffix(".")
    if not context or word == last or not _TARGET_WORD.fullmatch(word):
        return None
    return {"context": context, "word": word}


# Data file name (as the YAMLs give it) -> its builder.
_BUILDERS: dict[str, Callable[[], list[dict]]] = {
    "stat_wiki_ppl.jsonl": wiki_documents,
    "stat_pang_lee.jsonl": pang_lee_reviews,
    "stat_analogies.jsonl": analogy_questions,
    "stat_lastword.jsonl": lastword_passages,
}
