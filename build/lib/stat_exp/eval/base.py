"""The evaluator interface: a configured callable that measures a (pruned) model in memory."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


class Evaluator(ABC):
    """Instantiated from conf/eval/*.yaml; returns metrics keyed "<name>/<metric>"."""

    name: ClassVar[str] = ""

    @abstractmethod
    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> dict[str, float]:
        ...
