"""The adapter interface: a declarative description of one model family.

Everything downstream (calibration, FLOPs model, pruners, surgery) talks to a model only through
these parts, so a new family is one small adapter, never a change in a pruner.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import nn


@dataclass
class AttentionParts:
    """The projections of one attention block and its head layout."""

    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class FFNParts:
    """The projections of one feed-forward block: up (and gate, when gated) then down."""

    up: nn.Linear
    down: nn.Linear
    gate: nn.Linear | None = None

    @property
    def width(self) -> int:
        return self.down.in_features

    @property
    def inputs(self) -> list[nn.Linear]:
        """The projections whose output rows are the FFN neurons."""
        return [m for m in (self.gate, self.up) if m is not None]


class ModelAdapter(ABC):
    """Maps a transformers model onto blocks of attention + FFN parts.

    Subclasses declare `model_types` (matched against `config.model_type`) and locate the parts.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    causal: ClassVar[bool] = True
    # Post-LN blocks (original BERT): the residual sum is normalised after each sublayer, so the
    # FFN's residual is the FFN's own input; pre-norm blocks add to block input + attention output.
    post_ln: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    @abstractmethod
    def layers(self) -> list[nn.Module]:
        """The transformer blocks, in order; calibration feeds them one at a time."""

    @abstractmethod
    def attention(self, layer: nn.Module) -> AttentionParts:
        """The attention parts of one block, with its current head counts."""

    @abstractmethod
    def ffn(self, layer: nn.Module) -> FFNParts:
        """The feed-forward parts of one block."""

    @abstractmethod
    def set_head_counts(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Update the attention module's bookkeeping after its projections were sliced."""

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def structure(self) -> dict[str, list[int]]:
        """Per-layer head, KV-head and neuron counts: the record of what pruning left."""
        heads, kv_heads, neurons = [], [], []
        for layer in self.layers():
            attn = self.attention(layer)
            heads.append(attn.num_heads)
            kv_heads.append(attn.num_kv_heads)
            neurons.append(self.ffn(layer).width)
        return {"heads": heads, "kv_heads": kv_heads, "neurons": neurons}
