"""Calibration batches: random fixed-length windows of one tokenized text stream.

This is the SliceGPT / Wanda / SparseGPT protocol: tokenize the calibration text once, then draw
`num_examples` start offsets uniformly at random (seeded) and take `seq_len` tokens from each.
Windows may cross article boundaries, exactly as in those papers.
"""

from __future__ import annotations

import torch

from stat_exp.data.base import Calibration
from stat_exp.data.calib_size import AUTO, NumExamples, resolved
from stat_exp.data.text import DataError, check_text_source, encode, load_text
from stat_exp.types import PositiveInt, Propagate, Seed, SeqLen


def calibration_batches(
    tokenizer,
    source: str,
    num_examples: int,
    seq_len: int,
    seed: int,
    batch_size: int,
) -> list[dict[str, torch.Tensor]]:
    """Deterministic batches {"input_ids", "attention_mask"} of shape (<= batch_size, seq_len)."""
    for name, value in (("num_examples", num_examples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"calibration {name} must be a positive integer, got {value!r}")
    ids = encode(tokenizer, load_text(source))
    windows = sample_windows(ids, num_examples, seq_len, seed, source=source)
    return [
        {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
        for batch in windows.split(batch_size)
    ]


def sample_windows(ids: torch.Tensor, num_examples: int, seq_len: int, seed: int, source: str = "text") -> torch.Tensor:
    """(num_examples, seq_len) windows of a 1-D token stream at seeded random offsets."""
    n = ids.numel()
    if n < seq_len + 1:
        raise DataError(
            f"calibration source '{source}' has only {n} tokens; seq_len={seq_len} needs at least {seq_len + 1}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len, (num_examples,), generator=generator)
    offsets = starts[:, None] + torch.arange(seq_len)[None, :]
    return ids[offsets].contiguous()


class TextCalibration(Calibration):
    """The calibration config (conf/calib/wiki.yaml): random windows of a text source.

    `propagate` says what the next block is fed while pruning: the dense outputs of the previous
    block (`dense`, as in the paper's code) or its pruned outputs (`pruned`). `num_examples=auto`
    follows the model (stat_exp.data.calib_size); the planner resolves it.
    """

    def __init__(self, source: str, num_examples: NumExamples, seq_len: SeqLen, batch_size: PositiveInt = 8,
                 seed: Seed = 0, propagate: Propagate = "dense"):
        self.source, self.num_examples, self.seq_len = source, num_examples, seq_len
        self.batch_size, self.seed, self.propagate = batch_size, seed, propagate

    @property
    def longest_sequence(self) -> int:
        return self.seq_len

    @property
    def tokens(self) -> int | None:
        """Every window is full: exactly num_examples x seq_len tokens (None for `auto`: the planner
        sizes it, never below the tokens the widest layer needs)."""
        return None if self.num_examples == AUTO else self.num_examples * self.seq_len

    def check(self) -> None:
        check_text_source(self.source)

    def batches(self, tokenizer, num_examples: int | None = None) -> list[dict[str, torch.Tensor]]:
        """The calibration batches; `num_examples` overrides the configured count (a pruner's own draw,
        or the count `auto` resolved to)."""
        return calibration_batches(tokenizer, self.source, num_examples or resolved(self.num_examples), self.seq_len,
                                   self.seed, self.batch_size)

    def examples_for(self, tokenizer, tokens: int) -> int:
        """How many windows hold `tokens` tokens."""
        return -(-tokens // self.seq_len)

    def held_out_batches(self, tokenizer, count: int, drawn: int) -> list[dict[str, torch.Tensor]]:
        """About `count` windows drawn after the `drawn` calibration windows (a larger draw of the same
        seed starts with those), in whole batches that share no window with the calibration."""
        first = -(-drawn // self.batch_size)
        batches = self.batches(tokenizer, (first + -(-count // self.batch_size)) * self.batch_size)
        return batches[first:]
