"""SQuAD exact match and F1 as the official evaluation scripts compute them (v1.1 and v2.0).

Answers are normalised by lower-casing, removing punctuation, the articles a/an/the and extra
whitespace; F1 is over the normalised tokens; each question takes the best score over its gold
answers; totals are percentages. v2.0 differs in two places: gold answers that normalise to nothing
are dropped (an unanswerable question has the single gold answer ""), and when either side has no
tokens F1 is 1 if both are empty, else 0. v2.0 also reports the answerable and unanswerable
questions apart.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

from stat_exp.types import SQUAD_VERSIONS as VERSIONS

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, version: str = "1.1") -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version == "2.0" and (not pred or not ref):
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: Sequence[str], version: str) -> list[str]:
    if version == "1.1":
        return list(answers)
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def squad_scores(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]], version: str = "1.1"
                 ) -> dict[str, float]:
    """{"exact_match", "f1"} in percent over the questions of `answers` (a missing prediction
    scores 0, as in the scripts); v2.0 adds has_answer_* and no_answer_* (only for parts present)."""
    if version not in VERSIONS:
        raise ValueError(f"SQuAD version {version!r}; allowed: {', '.join(VERSIONS)}")
    em, fs, answerable = {}, {}, {}
    for qid, raw in answers.items():
        golds = gold_answers(raw, version)
        pred = predictions.get(qid)
        answerable[qid] = bool(raw)
        em[qid] = 0.0 if pred is None else max(exact(pred, g) for g in golds)
        fs[qid] = 0.0 if pred is None else max(f1(pred, g, version) for g in golds)
    scores = _totals(em, fs, list(answers), "")
    if version == "2.0":
        for name, wanted in (("has_answer_", True), ("no_answer_", False)):
            part = [q for q in answers if answerable[q] == wanted]
            if part:
                scores |= _totals(em, fs, part, name)
    return scores


def _totals(em: Mapping[str, float], fs: Mapping[str, float], qids: list[str], prefix: str) -> dict[str, float]:
    n = max(len(qids), 1)
    return {f"{prefix}exact_match": 100.0 * sum(em[q] for q in qids) / n,
            f"{prefix}f1": 100.0 * sum(fs[q] for q in qids) / n}
