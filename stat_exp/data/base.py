"""The calibration interface: every calibration source (`calib._target_`) is a `Calibration`.

The pipeline draws batches from every source the same way (`batches(tokenizer, num_examples=None)`,
where a pruner that draws its own examples, such as kwon's Fisher information, passes a count), and
the planner and the checks before the weights load read the same fields of every source. So a pruner
works on any source, and a source of your own plugs in with `calib._target_: your_module.YourSource`
by subclassing this class.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import torch
from transformers import PreTrainedTokenizerBase

from stat_exp.types import Propagate


class Calibration(ABC):
    """A configured calibration source. Subclasses set the fields below (plain attributes or dataclass
    fields) and implement `batches` and `longest_sequence`."""

    num_examples: int | str  # examples of one draw, or "auto" (a pruner may ask for another count)
    batch_size: int  # examples per batch
    seed: int  # the draw's seed
    propagate: Propagate = "dense"  # what the next block is fed while pruning: dense or pruned outputs

    @property
    @abstractmethod
    def longest_sequence(self) -> int:
        """Tokens of the longest example (checked against the model's positions)."""

    @property
    def tokens(self) -> int | None:
        """Tokens of one configured draw when the configuration alone decides it; None when it
        depends on the data (examples padded per batch)."""
        return None

    @property
    def available_examples(self) -> int | None:
        """Examples the source holds, where a draw cannot take more (a larger `num_examples` means all
        of them); None where a draw is not bounded (windows of a text) or the count needs the hub."""
        return None

    def examples_for(self, tokenizer: PreTrainedTokenizerBase, tokens: int) -> int:
        """How many examples hold about `tokens` tokens (what `num_examples=auto` resolves to); by
        default, examples of `longest_sequence` tokens."""
        return -(-tokens // self.longest_sequence)

    def check(self) -> None:
        """What can be checked before the model loads: data files exist and are readable text, hub
        names parse. Raises a one-line DataError; the default checks nothing."""

    @abstractmethod
    def batches(self, tokenizer: PreTrainedTokenizerBase,
                num_examples: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Deterministic model inputs (each a dict with at least input_ids and attention_mask; task
        labels under stat_exp.calibrate.LABELS for loss-based pruners); `num_examples` replaces the
        configured count."""
