"""Calibration: stream batches through the blocks, accumulating the statistics a pruner needs.

The statistics (Gram matrices, sketches or channel moments) are accumulated while the batches
stream, never the activations themselves (except with the `qr` backend, which needs them by
definition). Blocks are visited either all at once per batch, or one at a time over all batches
with their weights moved to the device in turn (see `LayerStream`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from tqdm.auto import tqdm

from stat_exp.execution.choices import model_major
from stat_exp.execution.offload import BlockStore
from stat_exp.factorize.base import Accumulator
from stat_exp.models.base import ModelAdapter
from stat_exp.models.hooks import Hooks, StopForward, stop_forward, stops_forward
from stat_exp.types import LABELS, PROPAGATE_MODES


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's model inputs on `device` (labels left out: no loss is computed while streaming)."""
    return {k: v.to(device) for k, v in batch.items() if k != LABELS}


class ChannelMoments:
    """Per-channel count, sum and sum of squares (float64): what norm/variance scores need."""

    def __init__(self, dim: int, device: torch.device):
        self.n_tokens = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        # Per-batch sums in the activations' precision, at least float32 (cascade-summed), running
        # sums in float64: casting every activation to float64 cost more than the sums.
        self.n_tokens += x.shape[0]
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        self.sum += x.sum(0)
        self.sumsq += torch.linalg.vector_norm(x, dim=0).square()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n_tokens, 1)

    @property
    def norm(self) -> torch.Tensor:
        """||X_j||_2 over calibration tokens."""
        return self.sumsq.sqrt()

    @property
    def variance(self) -> torch.Tensor:
        return (self.sumsq / max(self.n_tokens, 1) - self.mean.square()).clamp_min(0)


class CrossGram:
    """sum over tokens of x_pruned^T x_dense (float64): how the pruned model's activations of a
    prunable input relate to the dense model's on the same tokens, for corrections fitted to the
    dense model's outputs. Per-batch products in float32, running sum in float64."""

    def __init__(self, dim: int, device: torch.device):
        self.C = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, pruned: torch.Tensor, dense: torch.Tensor) -> None:
        self.C += (pruned.to(self.C.device, torch.float32).T @ dense.to(self.C.device, torch.float32)).double()


@dataclass
class NormGain:
    """How much a sublayer's post-norm (Gemma 2 and later: x + norm(attn(x))) scales an error in the
    output it normalises before the error reaches the residual stream: per token ||norm(y)||^2 /
    ||y||^2 (about g^2 / rms(y)^2), as a geometric mean over tokens, so a few tiny outputs do not
    dominate. 1 where the sublayer has no post-norm."""

    log_sum: float = 0.0
    n_tokens: int = 0

    def update(self, y: torch.Tensor, normed: torch.Tensor) -> None:
        y_sq = torch.linalg.vector_norm(y.float(), dim=-1).double().square()
        out_sq = torch.linalg.vector_norm(normed.float(), dim=-1).double().square()
        self.log_sum += float((out_sq.clamp_min(1e-300) / y_sq.clamp_min(1e-300)).log().sum())
        self.n_tokens += y_sq.numel()

    @property
    def value(self) -> float:
        return math.exp(self.log_sum / self.n_tokens) if self.n_tokens else 1.0


@dataclass
class LayerStats:
    """Statistics of one block's two prunable inputs: the head outputs (input of O) and the FFN
    hidden activations (input of down), over non-padding calibration tokens."""

    attn: ChannelMoments | None = None  # only for pruners that score by channel moments
    ffn: ChannelMoments | None = None
    attn_factor: Accumulator | None = None
    ffn_factor: Accumulator | None = None
    # With dense targets (propagate=pruned): the pruned inputs' cross Grams with the dense model's
    attn_cross: CrossGram | None = None
    ffn_cross: CrossGram | None = None
    n_tokens: int = 0
    # Per-token squared input norms, in a buffer sized before the batches stream: small tensors
    # kept batch after batch would pin glibc's heap between the large temporary ones, and the
    # process would grow with every calibration batch (measured: ~200 MB per batch of 8 x 256).
    token_energy: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    attn_gain: NormGain = field(default_factory=NormGain)  # the attention output's post-norm, if any
    ffn_gain: NormGain = field(default_factory=NormGain)
    extra: dict = field(default_factory=dict)

    def add_token_energy(self, energy: torch.Tensor) -> None:
        end = self.n_tokens + energy.shape[0]
        if end > self.token_energy.shape[0]:  # capacity unknown up front: grow geometrically
            grown = torch.empty(max(end, 2 * self.token_energy.shape[0]), dtype=torch.float64)
            grown[: self.n_tokens] = self.token_energy[: self.n_tokens]
            self.token_energy = grown
        self.token_energy[self.n_tokens: end] = energy
        self.n_tokens = end

    @property
    def typical_energy(self) -> float:
        """n_tokens x the median token's squared input norm: the residual-stream energy without the
        few tokens that carry massive activations (which otherwise dominate the sum)."""
        return self.n_tokens * float(self.token_energy[: self.n_tokens].median()) if self.n_tokens else 0.0


@dataclass
class BlockCall:
    """Everything a block is called with besides its hidden states, for one batch: masks, position
    embeddings, cache positions, positional or keyword. Blocks of one model may differ (sliding and
    global attention layers get different masks), so every block's own call is kept; blocks that
    share a tensor (the same mask) share the object, so this costs no memory per block."""

    args: tuple
    kwargs: dict


@dataclass
class BlockBoundary:
    """The calibration set at the current block boundary: one hidden-state tensor per batch (the only
    thing that grows with the number of calibration tokens; it does not grow with depth), where the
    tokens are real, and every block's own call arguments per batch."""

    hidden: list[torch.Tensor]
    masks: list[torch.Tensor | None]
    calls: list[list[BlockCall]]  # [batch][block]


def capture_block_inputs(model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                         device: torch.device, home: torch.device | None = None) -> BlockBoundary:
    """Run each batch through the model with every block replaced by a recorder of its arguments.

    No block computes anything (their weights may be on the host, on disk or on the meta device):
    each recorder keeps what its block is called with and passes the hidden states on unchanged,
    and the forward pass stops after the last block. Block 0's hidden states are the calibration
    inputs; they are kept on `home` (the host when blocks are offloaded) in the model dtype.
    """
    layers = adapter.layers()
    home = device if home is None else home
    boundary = BlockBoundary([], [], [])
    calls: list[BlockCall | None] = [None] * len(layers)

    def recorder(i: int):
        def forward(*args, **kwargs):
            hidden, rest = (args[0], tuple(args[1:])) if args else (kwargs.pop("hidden_states"), ())
            calls[i] = BlockCall(rest, dict(kwargs))
            if i == 0:
                boundary.hidden.append(hidden.detach().to(home))
            if i == len(layers) - 1:
                raise StopForward
            return hidden
        return forward

    with replaced_forwards(layers, recorder), torch.inference_mode():
        for batch in batches:
            batch = model_inputs(batch, device)
            with stops_forward():
                model(**batch, use_cache=False)
            boundary.masks.append(padding_mask(batch))
            boundary.calls.append(cast(list[BlockCall], list(calls)))  # every block was called
    return boundary


@contextmanager
def replaced_forwards(layers: list[nn.Module], forward_of: Callable[[int], Callable]) -> Iterator[None]:
    """Every block's forward replaced by `forward_of(i)` while the context lasts, then restored
    (an instance's own forward, e.g. accelerate's dispatch hook, included)."""
    own = [layer.__dict__.get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = forward_of(i)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward  # the class's forward again
            else:
                layer.forward = forward


def _first_output(out):
    return out[0] if isinstance(out, tuple) else out


class LayerStream:
    """Iterates blocks with their statistics; between two blocks the caller may prune the block.

    Two orders (which one: `stat_exp.execution.choices.model_major`, from `stream`, the store, the
    propagation and whether the accumulators hold the activations). Model-major: every batch
    runs through the whole model once with hooks on all blocks, so no hidden states are stored,
    but every block's statistics are held at once. Block-major: the calibration set is kept at the
    current block boundary (`BlockBoundary`) and one block at a time runs over all batches, so what
    is held does not grow with depth; blocks are moved to the device by `store` in turn (weights on
    the host or on disk, `offload=cpu|disk`) and written back as they finish.
    `propagate="dense"` feeds each block the original outputs of the previous one (the paper's
    code); `"pruned"` feeds it the outputs of the already-pruned previous block. With
    `dense_targets` (and `"pruned"`) the dense model's hidden states travel alongside: each block
    also runs, still dense, on them, and the statistics gain the cross Grams between the pruned
    and the dense activations of the same tokens (what a correction fitted to the dense model's
    outputs needs).
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                 device: torch.device, propagate: str = "dense",
                 make_accumulator: Callable[[int], Accumulator] | None = None, progress: bool = True,
                 stream: str = "model", moments: bool = True, store: BlockStore | None = None,
                 dense_targets: bool = False, holds_activations: bool = False):
        if propagate not in PROPAGATE_MODES:
            raise ValueError(f"calib.propagate={propagate!r}; allowed: {', '.join(PROPAGATE_MODES)}")
        self.model, self.adapter, self.batches = model, adapter, batches
        self.total_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        self.device, self.propagate = device, propagate
        self.make_accumulator = make_accumulator
        self.moments = moments  # per-channel moments cost a pass over every activation: only on request
        self.progress = progress
        self.store = store or BlockStore(model, adapter, device)
        self.model_major = model_major(stream, self.store.resident, propagate, holds_activations)
        self.dense_targets = dense_targets and propagate == "pruned"
        self.seconds = 0.0  # time spent running blocks and accumulating statistics

    def __iter__(self) -> Iterator[tuple[int, nn.Module, LayerStats]]:
        if self.model_major:
            yield from self._model_major()
        else:
            yield from self._block_major()

    def _model_major(self) -> Iterator[tuple[int, nn.Module, LayerStats]]:
        start = time.perf_counter()
        layers = self.adapter.layers()
        stats: list[LayerStats | None] = [self._new_stats(layer) for layer in layers]
        mask: list[torch.Tensor | None] = [None]
        with Hooks() as hooks, torch.inference_mode():
            for layer, st in zip(layers, stats):
                self._hooks(hooks, layer, cast(LayerStats, st), mask, energy=True)
            hooks.post(layers[-1], stop_forward)  # the LM head is not needed
            for batch in tqdm(self.batches, desc="calibrate", disable=not self.progress):
                batch = model_inputs(batch, self.device)
                mask[0] = padding_mask(batch)
                with stops_forward():
                    self.model(**batch, use_cache=False)
        self.seconds += time.perf_counter() - start
        for i, layer in enumerate(tqdm(layers, desc="prune", disable=not self.progress)):
            current, stats[i] = stats[i], None  # the caller holds what it still needs
            yield i, layer, cast(LayerStats, current)

    def _block_major(self) -> Iterator[tuple[int, nn.Module, LayerStats]]:
        start = time.perf_counter()
        home = self.device if self.store.resident else torch.device("cpu")
        boundary = capture_block_inputs(self.model, self.adapter, self.batches, self.device, home)
        dense = list(boundary.hidden) if self.dense_targets else None  # the dense model's, side by side
        n = len(self.adapter.layers())
        for i in tqdm(range(n), desc="calibrate+prune", disable=not self.progress):
            layer = self.store.onload(i)
            before = _parameter_ids(layer)
            stats = self._new_stats(layer)
            # Fed the pruned model's outputs, this run's own outputs are replaced by the pruned
            # block's: it stops once the last statistic is in (before the down projection).
            partial = self.propagate == "pruned" and self.adapter.ffn(layer).post_norm is None
            outputs = self._run(layer, boundary, i, stats, dense, partial)
            self.seconds += time.perf_counter() - start
            yield i, layer, stats
            start = time.perf_counter()
            pruned = _parameter_ids(layer) != before  # surgery swaps Parameter objects
            if self.propagate == "pruned" and (pruned or partial) and i + 1 < n:
                outputs = self._run(layer, boundary, i, None)
            self.store.offload(i)
            boundary.hidden = outputs

    def _new_stats(self, layer: nn.Module) -> LayerStats:
        attn, ffn = self.adapter.attention(layer), self.adapter.ffn(layer)
        d_attn, d_ffn = attn.o.in_features, ffn.down.in_features
        make, moments, cross = self.make_accumulator, self.moments, self.dense_targets
        return LayerStats(token_energy=torch.empty(self.total_tokens, dtype=torch.float64),
                          attn=ChannelMoments(d_attn, self.device) if moments else None,
                          ffn=ChannelMoments(d_ffn, self.device) if moments else None,
                          attn_factor=make(d_attn) if make else None, ffn_factor=make(d_ffn) if make else None,
                          attn_cross=CrossGram(d_attn, self.device) if cross else None,
                          ffn_cross=CrossGram(d_ffn, self.device) if cross else None)

    def _hooks(self, hooks: Hooks, layer: nn.Module, stats: LayerStats, mask: list, energy: bool,
               dense: dict[str, torch.Tensor] | None = None) -> None:
        """Hooks that accumulate `stats` from the block's O and down inputs (and, with `energy`, its
        input); `dense` holds the current batch's dense O and down inputs, for the cross Grams."""
        def accumulate(moments: ChannelMoments | None, factor: Accumulator | None, cross: CrossGram | None,
                       key: str):
            def fn(module, args):  # some blocks (OPT) flatten tokens before the FFN
                x = real_tokens(args[0], mask[0])
                if moments is not None:
                    moments.update(x)
                if factor is not None:
                    factor.update(x)
                if cross is not None and dense is not None:
                    cross.update(x, dense[key])
            return fn

        def block_input(module, args, kwargs):
            _record_input(stats, args[0] if args else kwargs["hidden_states"], mask[0])

        def post_norm(gain: NormGain):
            def fn(module, args, output):
                gain.update(real_tokens(args[0], mask[0]), real_tokens(output, mask[0]))
            return fn

        attn, ffn = self.adapter.attention(layer), self.adapter.ffn(layer)
        attn_hook = accumulate(stats.attn, stats.attn_factor, stats.attn_cross, "o")
        ffn_hook = accumulate(stats.ffn, stats.ffn_factor, stats.ffn_cross, "down")
        hooks.pre(attn.o, attn_hook).pre(ffn.down, ffn_hook)
        for part, gain in ((attn, stats.attn_gain), (ffn, stats.ffn_gain)):
            if part.post_norm is not None:
                hooks.post(part.post_norm, post_norm(gain))
        if energy:
            hooks.pre(layer, block_input, with_kwargs=True)

    @torch.inference_mode()
    def _run(self, layer: nn.Module, boundary: BlockBoundary, index: int, stats: LayerStats | None,
             dense: list[torch.Tensor] | None = None, partial: bool = False) -> list[torch.Tensor]:
        """Run block `index` over all batches with its own call arguments; with `stats`, accumulate
        them. Outputs go back where the boundary keeps its hidden states. With `dense` (the dense
        model's hidden states at this boundary) each batch first runs on those, to pair the
        activations for the cross Grams; `dense` moves on to the dense block's outputs. `partial`:
        each batch stops at the down projection's input (the last statistic); no outputs."""
        mask: list[torch.Tensor | None] = [None]
        current: dict[str, torch.Tensor] = {}  # this batch's dense O and down inputs
        outputs = []
        for b, (hidden, batch_mask, calls) in enumerate(zip(boundary.hidden, boundary.masks, boundary.calls)):
            mask[0] = batch_mask
            call = calls[index]
            if dense is not None and stats is not None:  # before the hooks: the dense run accumulates nothing
                dense[b] = self._dense_run(layer, dense[b], call, batch_mask, current).to(dense[b].device)
            out = None  # stays None when the partial run stops the forward
            with Hooks() as hooks, stops_forward():
                if stats is not None:
                    self._hooks(hooks, layer, stats, mask, energy=False, dense=current)
                if partial:  # registered after the statistics' hooks, so they fire first
                    _stop_when_both_seen(hooks, self.adapter.attention(layer).o, self.adapter.ffn(layer).down)
                hidden = hidden.to(self.device)
                if stats is not None:
                    _record_input(stats, hidden, batch_mask)
                out = _first_output(layer(hidden, *call.args, **call.kwargs))
            if out is not None:
                outputs.append(out.to(boundary.hidden[0].device))
        return outputs

    def _dense_run(self, layer: nn.Module, hidden: torch.Tensor, call: BlockCall, mask: torch.Tensor | None,
                   current: dict[str, torch.Tensor]) -> torch.Tensor:
        """The (still dense) block on the dense hidden states of one batch; its O and down inputs
        land in `current`."""
        def keep(key: str):
            def fn(module, args):
                current[key] = real_tokens(args[0], mask)
            return fn

        with Hooks() as hooks:
            hooks.pre(self.adapter.attention(layer).o, keep("o")).pre(self.adapter.ffn(layer).down, keep("down"))
            return _first_output(layer(hidden.to(self.device), *call.args, **call.kwargs))


def _stop_when_both_seen(hooks: Hooks, a: nn.Module, b: nn.Module) -> None:
    """Hooks that end the forward pass once both modules have been called (in either order)."""
    seen: set[int] = set()

    def hook(module, args):
        seen.add(id(module))
        if len(seen) == 2:
            raise StopForward
    hooks.pre(a, hook).pre(b, hook)


def _parameter_ids(layer: nn.Module) -> set[int]:
    return {id(p) for p in layer.parameters()}


def padding_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Which tokens are real, or None when all are (then no token needs to be dropped)."""
    mask = batch["attention_mask"].bool()
    return None if bool(mask.all()) else mask


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, dim) or already-flat (tokens, dim) activations -> (real tokens, dim)."""
    x = x.reshape(-1, x.shape[-1])
    return x if mask is None else x[mask.reshape(-1)]


def _record_input(stats: LayerStats, hidden: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Squared norms and count of the block's real input tokens (the residual stream it adds to)."""
    norms = torch.linalg.vector_norm(real_tokens(hidden, mask).float(), dim=-1)
    stats.add_token_energy(norms.double().square().cpu())
