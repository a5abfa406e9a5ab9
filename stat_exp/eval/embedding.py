"""Sentence-embedding benchmarks for an encoder, on the embedded real data (stat_exp.assets).

Embeddings are mean-pooled last hidden states over the tokens the attention mask marks real
(special tokens included, as sentence-transformers pools them).
- lee: Lee et al. (2005) 50 news documents; Spearman (and Pearson) of pairwise cosine similarities
  against the human similarity matrix, over the 1225 pairs of its upper triangle.
- simlex: SimLex-999; Spearman of the cosine of the two words' embeddings against human scores.
- polarity: Pang & Lee 200 review sentences; accuracy of a logistic-regression probe on frozen
  embeddings, stratified k-fold cross-validation.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from annotated_types import Ge, MinLen
from scipy.stats import pearsonr, spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from transformers import PreTrainedTokenizerBase

from stat_exp.assets import corpus_path
from stat_exp.eval.base import Evaluator
from stat_exp.types import PositiveInt, Seed

Benchmark = Literal["lee", "simlex", "polarity"]
BENCHMARKS = get_args(Benchmark)


@torch.inference_mode()
def embed(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], device: torch.device,
          batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    """(len(texts), hidden) float32 mean-pooled embeddings; works for bare encoders and task models."""
    encoder = model.base_model
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(device)
            hidden = encoder(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out)


def _cosine_pairs(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).numpy()


class EmbeddingEval(Evaluator):
    """Lee document similarity, SimLex-999 and a Pang & Lee polarity probe (pick with `benchmarks`).

    `max_pairs` keeps the first SimLex pairs only and `max_docs` the first Lee documents (for quick
    tests); None uses everything.
    """

    name = "embedding"
    encoders_only = True  # mean-pooled bidirectional representations (a decoder's are causal)

    def __init__(self, benchmarks: Annotated[Sequence[Benchmark], MinLen(1)] = BENCHMARKS,
                 batch_size: PositiveInt = 32, max_length: PositiveInt = 256, folds: Annotated[int, Ge(2)] = 5,
                 seed: Seed = 0, max_pairs: PositiveInt | None = None, max_docs: PositiveInt | None = None):
        self.benchmarks = tuple(benchmarks)
        self.batch_size, self.max_length, self.folds, self.seed = batch_size, max_length, folds, seed
        self.max_pairs, self.max_docs = max_pairs, max_docs

    def lengths(self) -> tuple[int, int]:
        return self.batch_size, self.max_length

    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> dict[str, float]:
        def encode(texts: Sequence[str]) -> torch.Tensor:
            return embed(model, tokenizer, texts, device, self.batch_size, self.max_length)

        metrics: dict[str, float] = {}
        for benchmark in self.benchmarks:
            scores = getattr(self, f"_{benchmark}")(encode)
            metrics.update({f"{self.name}/{k}": v for k, v in scores.items()})
        return metrics

    def _lee(self, encode) -> dict[str, float]:
        data = json.loads(corpus_path("lee_sts").read_text(encoding="utf-8"))
        n = min(len(data["documents"]), self.max_docs or len(data["documents"]))
        emb = F.normalize(encode(data["documents"][:n]).double(), dim=-1)
        i, j = np.triu_indices(n, k=1)
        predicted = (emb @ emb.T).numpy()[i, j]
        human = np.asarray(data["similarity"], dtype=np.float64)[:n, :n][i, j]
        return {"lee_spearman": float(spearmanr(predicted, human).statistic),
                "lee_pearson": float(pearsonr(predicted, human).statistic)}

    def _simlex(self, encode) -> dict[str, float]:
        rows = [json.loads(line) for line in corpus_path("simlex").read_text(encoding="utf-8").splitlines() if line]
        rows = rows[: self.max_pairs] if self.max_pairs else rows
        words = sorted({w for r in rows for w in (r["word1"], r["word2"])})
        index = {w: k for k, w in enumerate(words)}
        emb = encode(words)
        predicted = _cosine_pairs(emb[[index[r["word1"]] for r in rows]], emb[[index[r["word2"]] for r in rows]])
        return {"simlex_spearman": float(spearmanr(predicted, [r["score"] for r in rows]).statistic)}

    def _polarity(self, encode) -> dict[str, float]:
        rows = [json.loads(line) for line in corpus_path("pang_lee").read_text(encoding="utf-8").splitlines() if line]
        features = encode([r["text"] for r in rows]).double().numpy()
        labels = np.array([r["label"] for r in rows])
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        folds = StratifiedKFold(n_splits=self.folds, shuffle=True, random_state=self.seed)
        return {"polarity_acc": float(cross_val_score(probe, features, labels, cv=folds).mean())}
