"""SQuAD v1.1 / v2.0 on a question-answering model: exact match and F1 with the official normalisation.

Every window of a question's context is scored; the answer is the best span (start + end logit) of
at most `max_answer_length` tokens among the `n_best` starts and ends of each window, inside the
context. For v2.0 the answer is empty when the no-answer score ([CLS] start + end, the lowest over
the windows) beats the best span by more than `null_score_diff_threshold`. This is the post-processing
of the reference fine-tuning scripts (and of Kwon et al.'s evaluation). Metrics, in percent as the
official scripts print them: squad/exact_match, squad/f1 (v2.0 also squad/has_answer_* and
squad/no_answer_*).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from stat_exp.calibrate import model_inputs
from stat_exp.data.squad import Features, SquadExample, check_version, encode, load_examples
from stat_exp.errors import ConfigError
from stat_exp.eval.base import Evaluator
from stat_exp.eval.squad_metric import squad_scores
from stat_exp.types import NonNegativeInt, PositiveInt, Seed, SquadVersion


def best_answer(example: SquadExample, windows: list[tuple[np.ndarray, np.ndarray, list]], n_best: int,
                max_answer_length: int, version: str, null_threshold: float) -> str:
    """The predicted answer text from each window's (start logits, end logits, context offsets)."""
    best_score, best_text, null_score = -np.inf, "", np.inf
    for start_logits, end_logits, offsets in windows:
        null_score = min(null_score, float(start_logits[0] + end_logits[0]))
        for i in np.argsort(start_logits)[::-1][:n_best]:
            for j in np.argsort(end_logits)[::-1][:n_best]:
                if (i >= len(offsets) or j >= len(offsets) or offsets[i] is None or offsets[j] is None
                        or j < i or j - i + 1 > max_answer_length):
                    continue
                score = float(start_logits[i] + end_logits[j])
                if score > best_score:
                    best_score, best_text = score, example.context[offsets[i][0]:offsets[j][1]]
    if version == "2.0" and null_score - best_score > null_threshold:
        return ""
    return best_text


class SquadEval(Evaluator):
    """`eval=squad`: a question-answering model on SQuAD's validation questions (or a local file)."""

    name = "squad"
    tasks = ("question_answering",)

    def __init__(self, version: SquadVersion = "1.1", data_file: str | None = None,
                 max_length: PositiveInt = 384, doc_stride: NonNegativeInt = 128, batch_size: PositiveInt = 32,
                 n_best: PositiveInt = 20, max_answer_length: PositiveInt = 30, null_score_diff_threshold: float = 0.0,
                 max_examples: PositiveInt | None = None, seed: Seed = 0, progress: bool = True):
        self.version = check_version(version, "eval.squad.version")
        self.max_length, self.doc_stride, self.batch_size = max_length, doc_stride, batch_size
        self.n_best, self.max_answer_length, self.null_threshold = n_best, max_answer_length, null_score_diff_threshold
        self.progress = progress
        # read now: a missing or malformed file fails before the model is pruned
        self.examples = load_examples(self.version, "validation", data_file, max_examples, seed)

    def lengths(self) -> tuple[int, int]:
        return self.batch_size, self.max_length

    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> dict[str, float]:
        predictions = self.predict(model, tokenizer, self.examples, device)
        scores = squad_scores(predictions, {e.id: e.answers for e in self.examples}, self.version)
        return {f"{self.name}/{k}": v for k, v in scores.items()}

    @torch.inference_mode()
    def predict(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[SquadExample],
                device: torch.device) -> dict[str, str]:
        """{question id: predicted answer text}."""
        features = encode(tokenizer, examples, self.max_length, self.doc_stride, self.batch_size)
        logits = self._logits(model, features, device)
        windows: list[list] = [[] for _ in examples]
        for (start, end), example, offsets in zip(logits, features.example, features.offsets):
            windows[example].append((start, end, offsets))
        return {e.id: best_answer(e, w, self.n_best, self.max_answer_length, self.version, self.null_threshold)
                for e, w in zip(examples, windows)}

    def _logits(self, model: nn.Module, features: Features, device: torch.device) -> list[tuple[np.ndarray, np.ndarray]]:
        was_training = model.training
        model.eval()
        out = []
        try:
            for batch in tqdm(features.batches, desc="squad", disable=not self.progress):
                result = model(**model_inputs(batch, device))
                if getattr(result, "start_logits", None) is None:
                    raise ConfigError(f"eval=squad needs a question-answering model (model.task=question_answering); "
                                      f"this one returns {type(result).__name__}")
                lengths = batch["attention_mask"].sum(1).tolist()
                for s, e, n in zip(result.start_logits.float().cpu().numpy(), result.end_logits.float().cpu().numpy(),
                                   lengths):
                    out.append((s[:n], e[:n]))
        finally:
            model.train(was_training)
        return out
