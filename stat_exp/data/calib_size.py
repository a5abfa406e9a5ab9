"""`calib.num_examples=auto`: as many calibration tokens as the model's widest correction needs.

The correction STAT folds into a layer is a least-squares fit with one unknown per kept unit, so it
overfits when the calibration holds too few tokens per unit. The calibration-size study
(`python -m benchmarks.stat_quality sizes`, README "calibration size") found the knee on SmolLM2 at
256 x 256 tokens for its 1,536 FFN neurons: there the FFN correction's error on held-out batches is
1.12x its in-sample error (1.27x at half the tokens, 1.54x at a quarter), and more tokens change
nothing beyond noise. `auto` asks for the same number of tokens per unit of the largest rank a layer
can keep (its FFN width or attention width, whichever is wider: a budget may keep a layer whole):
1,536 units -> 65,536 tokens, Llama-2-7B's 11,008 -> 469,675 tokens.

The planner bounds it (stat_exp.execution.plan): `auto` takes the largest count whose plan fits the memory the
run has and whose predicted pruning time stays within `AUTO_MAX_SECONDS` (an hour; at a nominal
throughput per device kind, 1 TFLOP/s on a CPU and 200 on a GPU unless `execution.tflops` says
otherwise, so the choice does not depend on the machine's load), and says in one line what it gave
up. A 7B model reaches its knee on a GPU (about a minute of predicted calibration); on a CPU the
hour caps it, and the run warns. An explicit number is never changed. Sources with padded examples (GLUE,
SQuAD) turn the token target into a number of examples from the lengths of their own examples.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from stat_exp.data.text import DataError
from stat_exp.models.flops import LayerShape
from stat_exp.types import PositiveInt

AUTO = "auto"
NumExamples = PositiveInt | Literal["auto"]
KNEE_TOKENS_PER_UNIT = 256 * 256 / 1536  # the study's knee: 65,536 tokens for 1,536 FFN neurons
AUTO_MAX_SECONDS = 3600.0  # the planner's predicted pruning time `auto` may spend on calibration size


def resolved(num_examples: NumExamples) -> int:
    """A configured count, which must not be `auto` any more (the planner resolves it)."""
    if num_examples == AUTO:
        raise DataError("calib.num_examples=auto is resolved by the planner (stat_exp.execution.plan); pass the count")
    return num_examples


def largest_rank(shapes: Sequence[LayerShape]) -> int:
    """The most units one correction can keep: the widest FFN or attention output of any layer."""
    return max(max(s.ffn_width, s.num_heads * s.head_dim) for s in shapes)


def knee_tokens(rank: int) -> int:
    """Calibration tokens at the study's knee for a correction of `rank` units."""
    return math.ceil(KNEE_TOKENS_PER_UNIT * rank)


@dataclass
class CalibrationSize:
    """What a run calibrates on and why (results.json `calibration`). Once drawn, `num_examples` counts
    the sequences the layers saw (SQuAD: context windows) and `tokens` their real tokens; before, the
    planner's count and its upper bound (padded sources hold fewer real tokens)."""

    num_examples: int
    tokens: int
    largest_rank: int
    auto: bool
    capped_by: str | None = None  # what stopped `auto` short of the knee: "time", "memory" or "data"

    @property
    def tokens_per_unit(self) -> float:
        return self.tokens / self.largest_rank

    def summary(self) -> dict:
        return {"num_examples": self.num_examples, "tokens": self.tokens, "auto": self.auto,
                "largest_rank": self.largest_rank, "tokens_per_unit": round(self.tokens_per_unit, 2),
                "knee_tokens_per_unit": round(KNEE_TOKENS_PER_UNIT, 2), "capped_by": self.capped_by}

    def warning(self) -> str | None:
        """One line when the calibration is below the knee, naming what to change."""
        if self.tokens_per_unit >= KNEE_TOKENS_PER_UNIT * (1 - 1e-9):
            return None
        why, fix = "below the knee", "raise calib.num_examples"
        if self.capped_by == "data":
            why, fix = "auto took every example the calibration source holds", "calibrate on a larger set"
        elif self.capped_by:
            why = f"auto was capped by the planner's {self.capped_by}"
        return (f"calibration has {self.tokens:,} tokens, {self.tokens_per_unit:.1f} per unit of the largest "
                f"rank ({self.largest_rank:,}; the knee is {KNEE_TOKENS_PER_UNIT:.1f}): {why}; the correction "
                f"may overfit (see calibration.ffn_heldout_over_fit in results.json), {fix}")


def auto_examples(rank: int, tokens_per_example: int, fits: Callable[[int], str | None]) -> CalibrationSize:
    """The knee's number of examples, or the largest number `fits` accepts (it returns what a count
    exceeds, "time", "memory" or "data", or None); never fewer examples than the rank needs tokens."""
    def size(n: int, capped: str | None = None) -> CalibrationSize:
        return CalibrationSize(n, n * tokens_per_example, rank, True, capped)

    want = math.ceil(knee_tokens(rank) / tokens_per_example)
    exceeded = fits(want)
    if exceeded is None:
        return size(want)
    low, high = math.ceil(rank / tokens_per_example), want  # fits(low) is the floor either way
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid) is None:
            low = mid
        else:
            high = mid
    return size(low, exceeded)


SAMPLE_EXAMPLES = 1000  # examples a padded source tokenizes to learn its mean length


def examples_for_tokens(sample_tokens: int, sample_examples: int, tokens: int) -> int:
    """How many examples hold `tokens` tokens, when `sample_examples` of them held `sample_tokens`:
    the target over the mean length, rounded up; at least one."""
    mean = sample_tokens / max(sample_examples, 1)
    return max(1, math.ceil(tokens / max(mean, 1.0)))


def real_tokens(batches: Sequence[dict]) -> int:
    """Tokens the layers see in these batches (padding excluded)."""
    return sum(int(b["attention_mask"].sum()) for b in batches)
