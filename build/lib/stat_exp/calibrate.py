"""Layer-by-layer calibration: stream batches through one block at a time, accumulating statistics.

Only the current block's inputs are held; the statistics a pruner needs (Gram matrices, sketches
or channel moments) are accumulated while the batches stream, never the activations themselves
(except with the `qr` backend, which needs them by definition).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from stat_exp.factorize.base import Accumulator
from stat_exp.models.base import ModelAdapter

PROPAGATE_MODES = ("dense", "pruned")
LABELS = "labels"  # batch key for task labels: used by loss-based pruners, never fed to the stream


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


@dataclass
class LayerStats:
    """Statistics of one block's two prunable inputs: the head outputs (input of O) and the FFN
    hidden activations (input of down), over non-padding calibration tokens."""

    attn: ChannelMoments | None = None  # only for pruners that score by channel moments
    ffn: ChannelMoments | None = None
    attn_factor: Accumulator | None = None
    ffn_factor: Accumulator | None = None
    n_tokens: int = 0
    # Per-token squared input norms, in a buffer sized before the batches stream: small tensors
    # kept batch after batch would pin glibc's heap between the large temporary ones, and the
    # process would grow with every calibration batch (measured: ~200 MB per batch of 8 x 256).
    token_energy: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
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


class _StopForward(Exception):
    pass


@dataclass
class _BlockInput:
    hidden: torch.Tensor
    args: tuple  # positional arguments after the hidden states (some blocks take the mask so)
    kwargs: dict
    mask: torch.Tensor | None  # (batch, seq) bool: which tokens are real; None: all of them


def capture_block_inputs(model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                         device: torch.device) -> list[_BlockInput]:
    """Run the model up to its first block and keep exactly what that block is called with.

    Every argument is kept generically (position embeddings, masks, ..., positional or keyword),
    so changes in transformers' block signatures need no change here.
    """
    captured: list[_BlockInput] = []
    first = adapter.layers()[0]
    current_mask: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden, rest = (args[0], tuple(args[1:])) if args else (kwargs.pop("hidden_states"), ())
        captured.append(_BlockInput(hidden.detach(), rest, kwargs, current_mask[0]))
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in batches:
                batch = model_inputs(batch, device)
                current_mask[:] = [padding_mask(batch)]
                try:
                    model(**batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def _first_output(out):
    return out[0] if isinstance(out, tuple) else out


class LayerStream:
    """Iterates blocks with their statistics; between two blocks the caller may prune the block.

    `propagate="dense"` feeds each block the original outputs of the previous one (the paper's
    code). Then every block's statistics come from ordinary forward passes, batch by batch, with
    hooks on all blocks at once: no hidden states are stored, so memory does not grow with the
    number of calibration sequences. `"pruned"` feeds each block the outputs of the already-pruned
    previous block, which needs the blocks one at a time and their inputs kept between them.
    `model_major=False` forces the block-by-block order also for dense propagation (for backends
    that hold activations, so that only one block's are held at a time).
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                 device: torch.device, propagate: str = "dense",
                 make_accumulator: Callable[[int], Accumulator] | None = None, progress: bool = True,
                 model_major: bool = True, moments: bool = True):
        if propagate not in PROPAGATE_MODES:
            raise ValueError(f"calib.propagate={propagate!r}; allowed: {', '.join(PROPAGATE_MODES)}")
        self.model, self.adapter, self.batches = model, adapter, batches
        self.total_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        self.device, self.propagate = device, propagate
        self.make_accumulator = make_accumulator
        self.moments = moments  # per-channel moments cost a pass over every activation: only on request
        self.progress = progress
        self.model_major = model_major and propagate == "dense"
        self.seconds = 0.0  # time spent running blocks and accumulating statistics

    def __iter__(self) -> Iterator[tuple[int, nn.Module, LayerStats]]:
        if self.model_major:
            yield from self._model_major()
        else:
            yield from self._layer_major()

    def _model_major(self) -> Iterator[tuple[int, nn.Module, LayerStats]]:
        start = time.perf_counter()
        layers = self.adapter.layers()
        stats = [self._new_stats(layer) for layer in layers]
        mask: list[torch.Tensor | None] = [None]
        handles = [h for layer, st in zip(layers, stats) for h in self._hooks(layer, st, mask, energy=True)]

        def stop(module, args, output):
            raise _StopForward

        handles.append(layers[-1].register_forward_hook(stop))  # the LM head is not needed
        try:
            with torch.inference_mode():
                for batch in tqdm(self.batches, desc="calibrate", disable=not self.progress):
                    batch = model_inputs(batch, self.device)
                    mask[0] = padding_mask(batch)
                    try:
                        self.model(**batch, use_cache=False)
                    except _StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()
        self.seconds += time.perf_counter() - start
        for i, layer in enumerate(tqdm(layers, desc="prune", disable=not self.progress)):
            yield i, layer, stats[i]
            stats[i] = None  # the caller holds what it still needs

    def _layer_major(self) -> Iterator[tuple[int, nn.Module, LayerStats]]:
        start = time.perf_counter()
        inputs = capture_block_inputs(self.model, self.adapter, self.batches, self.device)
        layers = self.adapter.layers()
        for i, layer in enumerate(tqdm(layers, desc="calibrate+prune", disable=not self.progress)):
            stats = self._new_stats(layer)
            outputs = self._run(layer, inputs, stats)
            self.seconds += time.perf_counter() - start
            yield i, layer, stats
            start = time.perf_counter()
            if self.propagate == "pruned" and i + 1 < len(layers):
                outputs = self._run(layer, inputs, None)
            inputs = [_BlockInput(o, b.args, b.kwargs, b.mask) for o, b in zip(outputs, inputs)]

    def _new_stats(self, layer: nn.Module) -> LayerStats:
        attn, ffn = self.adapter.attention(layer), self.adapter.ffn(layer)
        d_attn, d_ffn = attn.o.in_features, ffn.down.in_features
        make, moments = self.make_accumulator, self.moments
        return LayerStats(token_energy=torch.empty(self.total_tokens, dtype=torch.float64),
                          attn=ChannelMoments(d_attn, self.device) if moments else None,
                          ffn=ChannelMoments(d_ffn, self.device) if moments else None,
                          attn_factor=make(d_attn) if make else None, ffn_factor=make(d_ffn) if make else None)

    def _hooks(self, layer: nn.Module, stats: LayerStats, mask: list, energy: bool) -> list:
        """Accumulate `stats` from the block's O and down inputs (and, with `energy`, its input)."""
        def accumulate(moments: ChannelMoments | None, factor: Accumulator | None):
            def fn(module, args):  # some blocks (OPT) flatten tokens before the FFN
                x = real_tokens(args[0], mask[0])
                if moments is not None:
                    moments.update(x)
                if factor is not None:
                    factor.update(x)
            return fn

        def block_input(module, args, kwargs):
            _record_input(stats, args[0] if args else kwargs["hidden_states"], mask[0])

        handles = [self.adapter.attention(layer).o.register_forward_pre_hook(accumulate(stats.attn, stats.attn_factor)),
                   self.adapter.ffn(layer).down.register_forward_pre_hook(accumulate(stats.ffn, stats.ffn_factor))]
        if energy:
            handles.append(layer.register_forward_pre_hook(block_input, with_kwargs=True))
        return handles

    @torch.inference_mode()
    def _run(self, layer: nn.Module, inputs: list[_BlockInput], stats: LayerStats | None) -> list[torch.Tensor]:
        """Run one block over all batches; with `stats`, accumulate them."""
        mask: list[torch.Tensor | None] = [None]
        handles = self._hooks(layer, stats, mask, energy=False) if stats is not None else []
        try:
            outputs = []
            for b in inputs:
                mask[0] = b.mask
                if stats is not None:
                    _record_input(stats, b.hidden, b.mask)
                outputs.append(_first_output(layer(b.hidden, *b.args, **b.kwargs)))
            return outputs
        finally:
            for h in handles:
                h.remove()


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
