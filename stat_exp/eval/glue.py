"""GLUE-style evaluation of a sequence-classification model, with each task's official metrics.

Metrics are computed with scipy/sklearn (the `evaluate` hub scripts fail offline). Keys are
"glue/<metric>"; tasks with two evaluation splits (MNLI) get "glue/<metric>_<split>" (matched,
mismatched). "glue/score" is the mean of the first split's metrics, the usual single number per
task (MRPC/QQP: mean of F1 and accuracy; STS-B: mean of Pearson and Spearman).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from stat_exp.data.glue import GlueTask, encode_batches, get_task, load_split, local_split
from stat_exp.errors import ConfigError
from stat_exp.eval.base import Evaluator
from stat_exp.types import NonNegativeInt, PositiveInt, Seed


def accuracy(pred: Sequence, label: Sequence) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(label)))


def f1(pred: Sequence, label: Sequence) -> float:
    """F1 of the positive class (1), as GLUE reports for MRPC and QQP."""
    return float(f1_score(label, pred, pos_label=1, zero_division=0.0))


def matthews(pred: Sequence, label: Sequence) -> float:
    return float(matthews_corrcoef(label, pred))


def pearson(pred: Sequence, label: Sequence) -> float:
    return float(pearsonr(pred, label).statistic)


def spearman(pred: Sequence, label: Sequence) -> float:
    return float(spearmanr(pred, label).statistic)


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def task_metrics(spec: GlueTask, pred: Sequence, label: Sequence) -> dict[str, float]:
    return {name: METRICS[name](pred, label) for name in spec.metrics}


def _check_label_map(label_map: Sequence[int] | None, spec: GlueTask) -> list[int] | None:
    if label_map is None:
        return None
    label_map = [int(i) for i in label_map]
    if spec.regression or sorted(label_map) != list(range(spec.num_labels)):
        raise ConfigError(f"label_map={label_map} must be a permutation of 0..{spec.num_labels - 1} "
                          f"for task {spec.name}")
    return label_map


class GlueEval(Evaluator):
    """Predictions over a task's evaluation split(s), scored with the task's official metrics.

    `label_map[i]` is the model output index of the dataset's label i, for checkpoints trained
    with another label order (e.g. TextAttack's MNLI models: [1, 2, 0]).
    """

    name = "glue"
    tasks = ("sequence_classification",)

    def __init__(self, task: str | None, data_dir: str | None = None, max_length: PositiveInt = 128,
                 batch_size: PositiveInt = 64, max_examples: PositiveInt | None = None, seed: Seed = 0,
                 label_map: Sequence[NonNegativeInt] | None = None, progress: bool = True):
        if task is None:
            raise ConfigError("eval=glue needs a task: eval.glue.task=<name> (or a model config with glue_task)")
        self.spec = get_task(task)
        self.data_dir, self.max_length, self.batch_size = data_dir, max_length, batch_size
        self.max_examples, self.seed, self.progress = max_examples, seed, progress
        self.label_map = _check_label_map(label_map, self.spec)

    def lengths(self) -> tuple[int, int]:
        return self.batch_size, self.max_length

    def check(self) -> None:
        if self.data_dir is not None:
            for split in self.spec.eval_splits:
                local_split(Path(self.data_dir).expanduser(), split)

    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for i, split in enumerate(self.spec.eval_splits):
            rows = load_split(self.spec, split, self.data_dir, self.max_examples, self.seed)
            rows.sort(key=lambda r: sum(len(r[k]) for k in self.spec.text_keys))  # less padding; metrics ignore order
            scores = task_metrics(self.spec, self.predict(model, tokenizer, rows, device), [r["label"] for r in rows])
            suffix = "" if len(self.spec.eval_splits) == 1 else "_" + split.removeprefix("validation_")
            metrics.update({f"{self.name}/{k}{suffix}": v for k, v in scores.items()})
            if i == 0:
                metrics[f"{self.name}/score"] = float(np.mean(list(scores.values())))
        return metrics

    @torch.inference_mode()
    def predict(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict],
                device: torch.device) -> np.ndarray:
        """Class indices in the dataset's label order, or regression outputs."""
        was_training = model.training
        model.eval()
        outputs = []
        try:
            batches = encode_batches(tokenizer, self.spec, rows, self.max_length, self.batch_size)
            for batch in tqdm(batches, desc=f"glue {self.spec.name}", disable=not self.progress):
                outputs.append(self._logits(model(**{k: v.to(device) for k, v in batch.items()})).float().cpu())
        finally:
            model.train(was_training)
        logits = torch.cat(outputs)
        if self.spec.regression:
            return logits[:, 0].numpy()
        pred = logits.argmax(-1).numpy()
        if self.label_map is not None:
            pred = np.argsort(self.label_map)[pred]  # model index -> dataset label
        return pred

    def _logits(self, output) -> torch.Tensor:
        logits = getattr(output, "logits", None)
        if logits is None:
            raise ConfigError(f"eval=glue needs a sequence-classification model (model.task=sequence_classification); "
                              f"this one returns {type(output).__name__} without logits")
        if logits.shape[-1] != self.spec.num_labels:
            raise ConfigError(f"the model has {logits.shape[-1]} outputs but task {self.spec.name} has "
                              f"{self.spec.num_labels} labels")
        return logits
