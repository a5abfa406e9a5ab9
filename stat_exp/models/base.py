"""The adapter interface: a declarative description of one model family.

Everything downstream (calibration, FLOPs model, pruners, surgery) talks to a model only through
these parts, so a new family is one small adapter (or none: `discovery` finds the parts), never a
change in a pruner. Every projection is an `nn.Linear` whose weight is (out, in): the pruners read
`o.weight` and `down.weight` that way and the calibration hooks the inputs of O and down.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from stat_exp.errors import UserError
from stat_exp.models.bookkeeping import update_head_bookkeeping

# Row layouts of a fused Q/K/V projection (d = head_dim, G = heads per KV head):
#   "concat":  [Q of every head | K of every KV head | V of every KV head]        (Phi-3, GPT-2)
#   "grouped": per KV head g: [Q of its G query heads, K_g, V_g], g = 0, 1, ...  (GPT-NeoX, Falcon;
#              with one query head per KV head this is the per-head interleaving [q_h, k_h, v_h])
QKVLayout = Literal["concat", "grouped"]


class UnsupportedModelError(UserError, ValueError):
    """A model whose blocks cannot be mapped onto attention and FFN parts (one line: which part)."""


@dataclass
class AttentionParts:
    """The projections of one attention block and its head layout.

    Q/K/V are either three projections (`q`, `k`, `v`) or one fused projection (`qkv`) whose rows
    follow `qkv_layout`. `post_norm`: a norm applied to the attention output before it is added to
    the residual stream (Gemma 2), or None; that norm's output is what enters the residual stream.
    """

    module: nn.Module
    q: nn.Linear | None
    k: nn.Linear | None
    v: nn.Linear | None
    o: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv: nn.Linear | None = None
    qkv_layout: QKVLayout = "concat"
    post_norm: nn.Module | None = None

    def __post_init__(self):
        given = [m is not None for m in (self.q, self.k, self.v)]
        if not (all(given) and self.qkv is None or not any(given) and self.qkv is not None):
            raise ValueError("AttentionParts needs either q, k and v, or one fused qkv projection")

    @property
    def reader(self) -> nn.Linear:
        """A projection that reads the block's input (q, or the fused qkv): its width is the stream's."""
        proj = self.q if self.q is not None else self.qkv
        assert proj is not None  # __post_init__: one of them is given
        return proj

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def projections(self) -> list[nn.Linear]:
        """Every distinct projection of the block (a fused one once)."""
        qkv = [self.q, self.k, self.v] if self.qkv is None else [self.qkv]
        return [*qkv, self.o]


@dataclass
class FFNParts:
    """The projections of one feed-forward block: up (and gate, when gated) then down.

    A fused `gate_up` projection holds the gate rows then the up rows ([gate | up], Phi-3); then
    `up` and `gate` are None. `post_norm`: as for attention.
    """

    up: nn.Linear | None
    down: nn.Linear
    gate: nn.Linear | None = None
    gate_up: nn.Linear | None = None
    post_norm: nn.Module | None = None

    def __post_init__(self):
        if not (self.up is not None and self.gate_up is None
                or self.up is None and self.gate is None and self.gate_up is not None):
            raise ValueError("FFNParts needs either up (and optionally gate), or one fused gate_up projection")

    @property
    def reader(self) -> nn.Linear:
        """A projection that reads the FFN's input (up, or the fused gate_up)."""
        proj = self.up if self.up is not None else self.gate_up
        assert proj is not None  # __post_init__: one of them is given
        return proj

    @property
    def width(self) -> int:
        return self.down.in_features

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.gate_up is not None

    @property
    def matrices(self) -> int:
        """Number of hidden x width matrices (3 when gated, fused or not): what the FLOPs scale with."""
        return 3 if self.gated else 2

    @property
    def projections(self) -> list[nn.Linear]:
        """Every distinct projection of the block (a fused one once)."""
        return [m for m in (self.gate, self.up, self.gate_up, self.down) if m is not None]


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
        self.config: Any = model.config

    @abstractmethod
    def layers(self) -> list[nn.Module]:
        """The transformer blocks, in order; calibration feeds them one at a time."""

    @abstractmethod
    def attention(self, layer: nn.Module) -> AttentionParts:
        """The attention parts of one block, with its current head counts."""

    @abstractmethod
    def ffn(self, layer: nn.Module) -> FFNParts:
        """The feed-forward parts of one block."""

    def set_head_counts(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Update the attention module's bookkeeping after its projections were sliced: every head
        count the stock module reads at run time (see `bookkeeping`). Override for modules that
        keep them elsewhere."""
        attn = self.attention(layer)
        update_head_bookkeeping(attn.module, num_heads, num_kv_heads, attn.head_dim)

    def shortcuts(self, layer: nn.Module) -> list[nn.Parameter]:
        """The residual shortcut matrices of a block sliced by SliceGPT (stat_exp.export.modeling_sliced
        names them), none for an ordinary block."""
        return [p for p in (getattr(layer, name, None) for name in ("attn_shortcut", "mlp_shortcut")) if p is not None]

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def structure(self) -> dict[str, list[int]]:
        """Per-layer head, KV-head and neuron counts: the record of what pruning left (with the
        residual widths of sliced blocks, and the indices of removed blocks, when there are any)."""
        heads, kv_heads, neurons = [], [], []
        for layer in self.layers():
            attn = self.attention(layer)
            heads.append(attn.num_heads)
            kv_heads.append(attn.num_kv_heads)
            neurons.append(self.ffn(layer).width)
        out = {"heads": heads, "kv_heads": kv_heads, "neurons": neurons}
        if any(self.shortcuts(layer) for layer in self.layers()):  # SliceGPT: the residual width each block reads
            out["stream_widths"] = [self.attention(layer).reader.in_features for layer in self.layers()]
        if removed := getattr(self.config, "removed_blocks", None):  # block_drop: indices in the input model
            out["removed_blocks"] = list(removed)
        return out


def has_token_logits(model: nn.Module) -> bool:
    """Whether the model outputs a distribution over the vocabulary at every token (a language-model
    head): what the output sensitivity samples labels from (stat_exp.prune.sensitivity)."""
    head = getattr(model, "get_output_embeddings", None)
    return callable(head) and head() is not None
