"""`slicegpt`: SliceGPT (Ashkboos et al., ICLR 2024), a narrower residual stream instead of fewer units.

1. Fuse every norm that reads the residual stream into the linears it feeds, so the norms become
   weightless RMS normalisations, which commute with any rotation of the stream. A LayerNorm (OPT)
   also subtracts the mean: every writer of the stream (embeddings, attention and FFN outputs) is
   centred instead, so the stream is mean-free and the LayerNorm an RMS normalisation.
2. Block by block, on the calibration data: the principal axes (eigenvectors of the uncentred
   Gram matrix, lightly damped) of the stream where the block reads it, between its two sublayers,
   and where it writes it. Rotate the readers and writers into those axes and keep the leading
   `d` of them; the residual itself changes basis through shortcut matrices Q_a^T Q_b.
3. The LM head reads the last block's output in its axes, unsliced (SliceGPT's default).
`d` is the largest width (a multiple of `round_to`) whose FLOPs, shortcuts included, stay within
the budget, or with `match=params` whose prunable parameters do. The sliced model is saved with
stat_exp.models.modeling_sliced. Llama-family (RMSNorm) and OPT (pre-LayerNorm) models.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from stat_exp.calibrate import real_tokens
from stat_exp.errors import ConfigError
from stat_exp.models.base import ModelAdapter
from stat_exp.models.decoders import LlamaAdapter, OPTAdapter
from stat_exp.models.hooks import Hooks, StopForward, stops_forward
from stat_exp.models.flops import FlopsModel, LayerShape, layer_weights, shapes_of
from stat_exp.models.modeling_sliced import convert
from stat_exp.prune.budget import BudgetError, BudgetSpec
from stat_exp.prune.whole_model import WholeModelPruner, block_inputs, run_block


@dataclass(frozen=True)
class Layout:
    """Where one family reads and writes the residual stream, by module path."""

    layers: str
    embeddings: tuple[str, ...]
    norms: tuple[str, str]  # inside a block: before attention, before the FFN
    attn: str
    mlp: tuple[str, ...]  # inside a block, applied in order
    final_norm: str
    centred: bool  # LayerNorm: the stream's writers are centred (mean subtraction)


LAYOUTS = {
    LlamaAdapter: Layout("model.layers", ("model.embed_tokens",), ("input_layernorm", "post_attention_layernorm"),
                         "self_attn", ("mlp",), "model.norm", centred=False),
    OPTAdapter: Layout("model.decoder.layers", ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
                       ("self_attn_layer_norm", "final_layer_norm"), "self_attn", ("fc1", "activation_fn", "fc2"),
                       "model.decoder.final_layer_norm", centred=True),
}


def layout_of(model: nn.Module, adapter: ModelAdapter) -> Layout:
    """The family's layout, or one line saying why SliceGPT cannot slice this model."""
    layout = LAYOUTS.get(type(adapter))
    cfg = model.config
    if layout is None:
        raise ConfigError(f"pruner=slicegpt handles Llama-family and OPT models, not model_type={cfg.model_type!r}")
    if layout.centred and (not getattr(cfg, "do_layer_norm_before", True)
                           or getattr(cfg, "word_embed_proj_dim", cfg.hidden_size) != cfg.hidden_size):
        raise ConfigError("pruner=slicegpt needs pre-LayerNorm OPT blocks without embedding projections "
                          "(not OPT-350m)")
    if model.get_output_embeddings() is None:
        raise ConfigError("pruner=slicegpt needs a causal LM with its LM head (model.task=causal_lm)")
    return layout


class SliceGptPruner(WholeModelPruner):
    name = "slicegpt"

    def __init__(self, match: Literal["flops", "params"] = "flops", round_to: int = 8, damping: float = 0.01):
        """`match`: the budget fraction is met in FLOPs, or in prunable parameters (SliceGPT's own
        "slicing" level). `round_to`: kept widths in multiples of this. `damping`: added to the Gram
        matrix's diagonal, as a fraction of its mean, before the eigendecomposition."""
        super().__init__()
        if round_to < 1 or damping < 0:
            raise ConfigError(f"pruner.round_to={round_to} must be >= 1 and pruner.damping={damping} >= 0")
        self.match, self.round_to, self.damping = match, round_to, damping

    @property
    def variant(self) -> str:
        return "equal params" if self.match == "params" else ""

    def transform(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                  flops: FlopsModel, budget: BudgetSpec) -> None:
        layout = layout_of(model, adapter)
        dims = self.widths(shapes_of(adapter), flops, budget.flops)
        slice_model(model, adapter, layout, batches, dims, self.damping)

    def widths(self, shapes: list[LayerShape], flops: FlopsModel, target: float) -> list[tuple[int, int, int]]:
        """Per block (d_in, d_mid, d_out): one width d everywhere but the last output (the LM head's
        input stays whole), d the largest multiple of `round_to` within the budget."""
        dense = shapes[0].hidden

        def dims(d: int) -> list[tuple[int, int, int]]:
            return [(d, d, d)] * (len(shapes) - 1) + [(d, d, dense)]

        def cost(d: int) -> float:
            sliced = [sliced_shape(s, *ds) for s, ds in zip(shapes, dims(d))]
            if self.match == "params":
                return sum(map(layer_weights, sliced)) / sum(map(layer_weights, shapes))
            return sum(map(flops.dense, sliced)) / sum(map(flops.dense, shapes))

        candidates = sorted({*range(self.round_to, dense + 1, self.round_to), dense}, reverse=True)
        for d in candidates:
            if cost(d) <= target * (1 + 1e-9):
                return dims(d)
        raise BudgetError(f"budget.flops={target} is below what pruner=slicegpt reaches at width {candidates[-1]} "
                          f"({cost(candidates[-1]):.3f})")


def sliced_shape(shape: LayerShape, d_in: int, d_mid: int, d_out: int) -> LayerShape:
    """A block's shape when its residual stream is read at `d_in`, `d_mid` and written at `d_out`."""
    return dataclasses.replace(shape, attn_in=d_in, hidden=d_mid, ffn_in=d_mid, ffn_out=d_out,
                               shortcut=d_in * d_mid + d_mid * d_out)


@torch.no_grad()
def slice_model(model: nn.Module, adapter: ModelAdapter, layout: Layout, batches: list[dict[str, torch.Tensor]],
                dims: list[tuple[int, int, int]], damping: float = 0.01) -> None:
    """Fuse, rotate and slice `model` in place to the per-block widths `dims`."""
    dense = model.config.hidden_size
    eps = _norm_eps(model.get_submodule(layout.final_norm))
    fuse_norms(model, adapter, layout)
    spec = {"layers": layout.layers, "layout": {"norms": list(layout.norms), "attn": layout.attn, "mlp": list(layout.mlp)},
            "final_norm": layout.final_norm, "mean_dim": dense, "eps": eps, "dims": [[dense] * 3] * len(dims)}
    convert(model, spec)  # weightless norms, identity shortcuts: the same function as before (spec updated below)
    boundary = block_inputs(model, adapter, batches)
    masks = boundary.masks
    Q = principal_axes(boundary.hidden, masks, damping)
    for path in layout.embeddings:
        emb = model.get_submodule(path)
        emb.weight = _param(emb.weight.double() @ Q[:, : dims[0][0]], emb.weight)
    hidden = [_rotate(h, Q[:, : dims[0][0]]) for h in boundary.hidden]
    for i, (layer, (d_in, d_mid, d_out)) in enumerate(zip(adapter.layers(), dims)):
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        for lin in _readers(attn):
            _rotate_inputs(lin, Q[:, :d_in])
        layer.attn_shortcut = _param(Q[:, :d_in].T, layer.attn_shortcut)  # back to the dense basis, for now
        Q_mid = principal_axes(_norm_inputs(layer, layout.norms[1], boundary, i, hidden), masks, damping)
        _rotate_outputs(attn.o, Q_mid[:, :d_mid])
        layer.attn_shortcut = _param(Q[:, :d_in].T @ Q_mid[:, :d_mid], layer.attn_shortcut)
        for lin in _readers(ffn):
            _rotate_inputs(lin, Q_mid[:, :d_mid])
        layer.mlp_shortcut = _param(Q_mid[:, :d_mid].T, layer.mlp_shortcut)
        out = run_block(layer, boundary, i, hidden)
        Q = principal_axes(out, masks, damping)
        _rotate_outputs(ffn.down, Q[:, :d_out])
        layer.mlp_shortcut = _param(Q_mid[:, :d_mid].T @ Q[:, :d_out], layer.mlp_shortcut)
        hidden = [_rotate(h, Q[:, :d_out]) for h in out]
        spec["dims"][i] = [d_in, d_mid, d_out]
    _rotate_inputs(model.get_output_embeddings(), Q[:, : dims[-1][2]])
    model.config.update({"tie_word_embeddings": False})


@torch.no_grad()
def fuse_norms(model: nn.Module, adapter: ModelAdapter, layout: Layout) -> None:
    """Fold every residual norm's scale (and shift) into the linears it feeds; for LayerNorm
    families first centre every writer of the stream. The LM head is untied from the embeddings."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())
    if layout.centred:
        for path in layout.embeddings:
            emb = model.get_submodule(path)
            emb.weight = _param(emb.weight.double() - emb.weight.double().mean(1, keepdim=True), emb.weight)
        for layer in adapter.layers():
            for lin in (adapter.attention(layer).o, adapter.ffn(layer).down):
                lin.weight = _param(lin.weight.double() - lin.weight.double().mean(0, keepdim=True), lin.weight)
                if lin.bias is not None:
                    lin.bias = _param(lin.bias.double() - lin.bias.double().mean(), lin.bias)
    for layer in adapter.layers():
        _fuse(layer.get_submodule(layout.norms[0]), _readers(adapter.attention(layer)))
        _fuse(layer.get_submodule(layout.norms[1]), _readers(adapter.ffn(layer)))
    _fuse(model.get_submodule(layout.final_norm), [head])


def _fuse(norm: nn.Module, readers: list[nn.Linear]) -> None:
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    for lin in readers:
        W = lin.weight.double()
        if bias is not None:
            shift = W @ bias.double()
            lin.bias = _param(shift if lin.bias is None else lin.bias.double() + shift, lin.weight)
        if weight is not None:
            lin.weight = _param(W * weight.double(), lin.weight)


def _norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-5)))


def _readers(parts) -> list[nn.Linear]:
    """The projections that read a sublayer's normalised input (all but the output projection)."""
    out = parts.o if hasattr(parts, "o") else parts.down
    return [p for p in parts.projections if p is not out]


def principal_axes(signals: list[torch.Tensor], masks: list[torch.Tensor | None], damping: float) -> torch.Tensor:
    """Eigenvectors of the (damped) uncentred Gram matrix of the real tokens, largest eigenvalue first (float64)."""
    gram = None
    for x, mask in zip(signals, masks):
        t = real_tokens(x, mask).double()
        gram = t.T @ t if gram is None else gram + t.T @ t
    gram += damping * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    values, vectors = torch.linalg.eigh(gram)
    return vectors[:, torch.argsort(values, descending=True)]


def _norm_inputs(layer: nn.Module, norm: str, boundary, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """The stream between the block's two sublayers (the input of its second norm), per batch; the
    FFN is not run."""
    found: list[torch.Tensor] = []

    def capture(module, args):
        found.append(args[0].detach())
        raise StopForward

    with Hooks().pre(layer.get_submodule(norm), capture):
        for h in hidden:
            with stops_forward():
                run_block(layer, boundary, index, [h], first_batch=len(found))
    return found


def _rotate(x: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    return (x.double() @ Q).to(x.dtype)


def _param(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.to(like.dtype).contiguous(), requires_grad=like.requires_grad)


def _rotate_inputs(lin: nn.Linear, Q: torch.Tensor) -> None:
    """lin reads x Q (the stream in the axes Q) instead of x."""
    lin.weight = _param(lin.weight.double() @ Q, lin.weight)
    lin.in_features = Q.shape[1]


def _rotate_outputs(lin: nn.Linear, Q: torch.Tensor) -> None:
    """lin writes its output in the axes Q (kept columns only)."""
    lin.weight = _param(Q.T @ lin.weight.double(), lin.weight)
    if lin.bias is not None:
        lin.bias = _param(lin.bias.double() @ Q, lin.bias)
    lin.out_features = Q.shape[1]
