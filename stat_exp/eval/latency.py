"""`eval=latency`: how fast the (pruned) model runs, which is what structured pruning is for.

- Prefill: one forward pass over `batch_size` x `seq_len` random tokens (no cache; a causal LM
  computes the last position's logits only, as generate's prefill does), reported as tokens per second.
- Decode (models that generate): after a prefill of `seq_len` tokens, `decode_tokens` greedy steps
  of one token each through the KV cache, reported as milliseconds per generated token. Every
  repeat starts from a copy of the same prefilled cache (copied outside the timed region).
Timing uses torch.utils.benchmark.Timer (on `threads` CPU threads, by default torch's current
count; it synchronises the accelerator around each run): `warmup` runs are discarded, then `repeats` runs are timed one by
one; the metrics are their median and interquartile range (`_iqr`). Random tokens, because the
speed of a dense model does not depend on what the tokens say.
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.benchmark import Timer
from transformers import PreTrainedTokenizerBase

from stat_exp.eval.base import Evaluator
from stat_exp.types import NonNegativeInt, PositiveInt, Seed


def time_runs(fn: Callable[[], object], warmup: int, repeats: int, setup: Callable[[], None] | None = None,
              threads: int | None = None) -> np.ndarray:
    """Seconds of `repeats` single runs of fn (after `warmup` untimed ones) on `threads` CPU threads
    (None: torch's current count); `setup` runs before each, untimed."""
    timer = Timer(stmt="fn()", setup="setup()", globals={"fn": fn, "setup": setup or (lambda: None)},
                  num_threads=threads or torch.get_num_threads())
    for _ in range(warmup):
        timer.timeit(1)
    return np.array([timer.timeit(1).times[0] for _ in range(repeats)])


def spread(values: np.ndarray) -> tuple[float, float]:
    """(median, interquartile range)."""
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return float(q50), float(q75 - q25)


def prefill_run(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    """One forward pass over `ids` without a cache. Like generate's prefill, a causal LM computes
    the logits of the last position only (the LM head is no part of what pruning shrinks)."""
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    return lambda: model(input_ids=ids, use_cache=False, **keep)


class DecodeRun:
    """`tokens` greedy steps of one token through the KV cache, each run from a fresh copy of the
    cache of one prefill of `ids` (call `setup` before each run; it is not part of the timing)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, tokens: int):
        prefilled = model(input_ids=ids, use_cache=True)
        self.model, self.tokens = model, tokens
        self.first, self.prefilled = prefilled.logits[:, -1:].argmax(-1), prefilled.past_key_values
        self.cache = None

    def setup(self) -> None:
        self.cache = copy.deepcopy(self.prefilled)

    def __call__(self) -> None:
        token = self.first
        for _ in range(self.tokens):
            token = self.model(input_ids=token, past_key_values=self.cache, use_cache=True).logits[:, -1:].argmax(-1)


class LatencyEval(Evaluator):
    """Prefill throughput and decode latency of the model in memory."""

    name = "latency"

    def __init__(self, batch_size: PositiveInt = 1, seq_len: PositiveInt = 256, decode_tokens: PositiveInt = 32,
                 warmup: NonNegativeInt = 1, repeats: PositiveInt = 5, threads: PositiveInt | None = None, seed: Seed = 0):
        """`threads`: CPU threads while timing (None: torch's current count)."""
        self.batch_size, self.seq_len, self.decode_tokens = batch_size, seq_len, decode_tokens
        self.warmup, self.repeats, self.threads, self.seed = warmup, repeats, threads, seed

    def lengths(self) -> tuple[int, int]:
        return self.batch_size, self.seq_len + self.decode_tokens  # the last decode step attends to all of them

    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> dict[str, float]:
        generator = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(0, model.config.vocab_size, (self.batch_size, self.seq_len), generator=generator).to(device)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                metrics = self.prefill(model, ids)
                if model.can_generate():
                    metrics.update(self.decode(model, ids))
        finally:
            model.train(was_training)
        return {f"{self.name}/{k}": v for k, v in metrics.items()}

    def prefill(self, model: nn.Module, ids: torch.Tensor) -> dict[str, float]:
        seconds = time_runs(prefill_run(model, ids), self.warmup, self.repeats, threads=self.threads)
        median, iqr = spread(ids.numel() / seconds)
        return {"prefill_tokens_per_s": median, "prefill_tokens_per_s_iqr": iqr}

    def decode(self, model: nn.Module, ids: torch.Tensor) -> dict[str, float]:
        run = DecodeRun(model, ids, self.decode_tokens)
        seconds = time_runs(run, self.warmup, self.repeats, setup=run.setup, threads=self.threads)
        median, iqr = spread(seconds * 1e3 / self.decode_tokens)
        return {"decode_ms_per_token": median, "decode_ms_per_token_iqr": iqr}
