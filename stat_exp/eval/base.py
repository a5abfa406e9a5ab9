"""The evaluator interface: a configured callable that measures a (pruned) model in memory."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


class Evaluator(ABC):
    """Instantiated from conf/eval/*.yaml; returns metrics keyed "<name>/<metric>".

    What it says about itself is checked before the weights load (stat_exp.preflight): the model
    tasks it can measure, whether it needs an encoder, its lengths against the model's positions,
    and its data files."""

    name: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = ()  # the model.task values it can measure (empty: any)
    encoders_only: ClassVar[bool] = False  # measures an encoder's representations, not a decoder's

    def check(self) -> None:
        """What can be checked before the model loads (its data files); raises a one-line DataError."""

    def lengths(self) -> tuple[int, int]:
        """(sequences, tokens each) of this evaluator's largest forward pass: the planner sizes the
        evaluation's logits by it before the model loads. The default assumes 8 x 256."""
        return 8, 256

    @abstractmethod
    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> dict[str, float]:
        ...
