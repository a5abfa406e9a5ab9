"""The adapter for any standard transformer: its parts found from the modules of its blocks.

Used when no explicit adapter claims a model's `model_type`. The blocks are the model's largest
list of identical modules; in the first block, projections are recognised by the names the
transformers library gives them (separate Q/K/V, or one fused QKV whose row layout the name
tells; gated, fused gate_up or plain FFNs; biases come along with the Linear modules), and one
forward pass of two tokens up to the end of that block tells which norms take an attention or
FFN output before it reaches the residual stream (post-norms, Gemma 2). Head counts are read
from the projection widths; a fused projection's split between query and KV heads from the
module's own bookkeeping (or the config). GPT-2's Conv1D projections are converted to
nn.Linear first (`conv1d`). What cannot be found is named in one line: the block type and
the missing part.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from stat_exp.models.base import AttentionParts, FFNParts, ModelAdapter, QKVLayout, UnsupportedModelError
from stat_exp.models.bookkeeping import KV_HEAD_ATTRS, shared_config, update_head_bookkeeping
from stat_exp.models.conv1d import convert_conv1d
from stat_exp.models.hooks import Hooks, stop_forward, stops_forward

Q_NAMES = ("q_proj", "query", "q_lin", "wq", "q")
K_NAMES = ("k_proj", "key", "k_lin", "wk", "k")
V_NAMES = ("v_proj", "value", "v_lin", "wv", "v")
FUSED_QKV: dict[str, QKVLayout] = {"qkv_proj": "concat", "c_attn": "concat", "Wqkv": "concat", "W_pack": "concat",
                                   "query_key_value": "grouped"}
O_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "out_lin", "wo", "o")
UP_NAMES = ("up_proj", "fc1", "dense_h_to_4h", "c_fc", "lin1", "fc_in", "intermediate.dense")
GATE_NAMES = ("gate_proj",)
GATE_UP_NAMES = ("gate_up_proj",)
DOWN_NAMES = ("down_proj", "fc2", "dense_4h_to_h", "c_proj", "lin2", "fc_out", "output.dense")
HEAD_DIM_ATTRS = ("head_dim", "head_size", "attention_head_size")
ALIBI_MODEL_TYPES = ("bloom", "mpt")  # per-head position biases built model-wide: heads cannot be cut


@dataclass(frozen=True)
class BlockPlan:
    """Where the parts of a block sit, as paths relative to the block (found on the first block)."""

    attention: str  # the module that runs the heads (holds Q/K/V and the head bookkeeping)
    o: str
    down: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_layout: QKVLayout = "concat"
    up: str | None = None
    gate: str | None = None
    gate_up: str | None = None
    attn_post_norm: str | None = None
    ffn_post_norm: str | None = None


class DiscoveredAdapter(ModelAdapter):
    """Attention and FFN parts of any block layout that `plan_block` recognises."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        model_type = getattr(self.config, "model_type", None)
        if getattr(self.config, "is_encoder_decoder", False):
            raise UnsupportedModelError(f"model_type {model_type!r} is an encoder-decoder model; only encoders "
                                        "or decoders can be pruned")
        if getattr(self.config, "alibi", False) or model_type in ALIBI_MODEL_TYPES:
            raise UnsupportedModelError(f"model_type {model_type!r} uses ALiBi position biases, built for all heads "
                                        "of the model at once; heads of such models cannot be pruned")
        self._layers = find_blocks(model)
        for layer in self._layers:
            convert_conv1d(layer)
        first = self._layers[0]
        self.plan = trace_post_norms(model, first, plan_block(first))
        self.causal = bool(getattr(first.get_submodule(self.plan.attention), "is_causal", True))

    def layers(self) -> list[nn.Module]:
        return list(self._layers)

    def _part(self, layer: nn.Module, path: str | None, what: str) -> nn.Module | None:
        if path is None:
            return None
        try:
            return layer.get_submodule(path)
        except AttributeError:
            raise UnsupportedModelError(f"block {type(layer).__name__}: no {what} at {path!r} (unlike the first "
                                        "block); blocks of different layouts need an explicit adapter") from None

    def attention(self, layer: nn.Module) -> AttentionParts:
        p = self.plan
        module = self._part(layer, p.attention, "attention module")
        q, k, v, qkv, o = (self._part(layer, path, what) for path, what in (
            (p.q, "query projection"), (p.k, "key projection"), (p.v, "value projection"),
            (p.qkv, "fused QKV projection"), (p.o, "attention output projection")))
        d = head_dim(module, self.config)
        if qkv is None:
            heads, kv_heads = q.out_features // d, k.out_features // d
        else:
            rows = qkv.out_features // d  # heads + 2 KV heads, whatever the layout
            kv_heads = fused_kv_heads(module, rows)
            heads = rows - 2 * kv_heads
        if kv_heads < 1 or heads < 1 or heads % kv_heads or o.in_features != heads * d:
            raise UnsupportedModelError(
                f"block {type(layer).__name__}: cannot read its head layout ({heads} query heads, {kv_heads} KV "
                f"heads of {d} channels, attention output width {o.in_features})")
        return AttentionParts(module=module, q=q, k=k, v=v, o=o, num_heads=heads, num_kv_heads=kv_heads,
                              head_dim=d, qkv=qkv, qkv_layout=p.qkv_layout,
                              post_norm=self._part(layer, p.attn_post_norm, "attention post-norm"))

    def ffn(self, layer: nn.Module) -> FFNParts:
        p = self.plan
        up, gate, gate_up, down = (self._part(layer, path, what) for path, what in (
            (p.up, "FFN up projection"), (p.gate, "FFN gate projection"), (p.gate_up, "fused FFN gate_up projection"),
            (p.down, "FFN down projection")))
        return FFNParts(up=up, down=down, gate=gate, gate_up=gate_up,
                        post_norm=self._part(layer, p.ffn_post_norm, "FFN post-norm"))

    def set_head_counts(self, layer: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        # not through attention(): a fused projection's head split is read from this very bookkeeping
        module = self._part(layer, self.plan.attention, "attention module")
        update_head_bookkeeping(module, num_heads, num_kv_heads, head_dim(module, self.config))


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: its largest (by parameters) list of modules of one class."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1
             and next(m.parameters(), None) is not None]
    if not lists:
        raise UnsupportedModelError(f"{type(model).__name__}: no list of transformer blocks (an nn.ModuleList of "
                                    "identical modules with parameters)")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def _matches(path: str, names: tuple[str, ...]) -> bool:
    """`path` ends with one of `names` (a name with dots matches that many trailing components)."""
    return any(path == n or path.endswith("." + n) for n in names)


def _one(block: nn.Module, linears: dict[str, nn.Linear], names: tuple[str, ...], what: str) -> str | None:
    found = [path for path in linears if _matches(path, names)]
    if len(found) > 1:
        raise UnsupportedModelError(f"block {type(block).__name__}: more than one {what} ({', '.join(found)})")
    return found[0] if found else None


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def plan_block(block: nn.Module) -> BlockPlan:
    """Find the parts of one block by their module names."""
    kind = type(block).__name__
    linears = {path: m for path, m in block.named_modules() if isinstance(m, nn.Linear)}
    q, k, v = (_one(block, linears, names, what) for names, what in (
        (Q_NAMES, "query projection"), (K_NAMES, "key projection"), (V_NAMES, "value projection")))
    qkv = _one(block, linears, tuple(FUSED_QKV), "fused QKV projection")
    if q and k and v and len({_parent(q), _parent(k), _parent(v)}) == 1:
        attention, qkv_parts = _parent(q), {"q": q, "k": k, "v": v}
    elif qkv:
        attention, qkv_parts = _parent(qkv), {"qkv": qkv, "qkv_layout": FUSED_QKV[qkv.rpartition(".")[2]]}
    else:
        raise UnsupportedModelError(
            f"block {kind}: no attention projections found (separate Q/K/V named {'/'.join(Q_NAMES[:3])}/..., "
            f"or a fused one named {'/'.join(FUSED_QKV)})")
    taken = {qkv_parts.get(n) for n in ("q", "k", "v", "qkv")}
    scope, o = attention, None
    while scope:  # widen the search to the enclosing modules (BERT: attention.output.dense), not the block
        inside = {p: m for p, m in linears.items() if p.startswith(scope + ".") and p not in taken}
        o = _one(block, inside, O_NAMES, "attention output projection")
        if o:
            break
        scope = _parent(scope)
    if o is None:
        raise UnsupportedModelError(f"block {kind}: no attention output projection found next to "
                                    f"{attention!r} (looked for {'/'.join(O_NAMES)})")
    rest = {p: m for p, m in linears.items() if not p.startswith(scope + ".")}  # outside the attention
    up, gate, gate_up, down = (_one(block, rest, names, what) for names, what in (
        (UP_NAMES, "FFN up projection"), (GATE_NAMES, "FFN gate projection"),
        (GATE_UP_NAMES, "fused FFN gate_up projection"), (DOWN_NAMES, "FFN down projection")))
    if down is None or not (up or gate_up):
        raise UnsupportedModelError(
            f"block {kind}: no feed-forward projections found (looked for an up projection named "
            f"{'/'.join(UP_NAMES + GATE_UP_NAMES)} and a down projection named {'/'.join(DOWN_NAMES)})")
    ffn_parts = {"up": up, "gate": gate} if up else {"gate_up": gate_up}
    return BlockPlan(attention=attention, o=o, down=down, **qkv_parts, **ffn_parts)


def head_dim(module: nn.Module, config) -> int:
    """Channels per head: the attention module's own value, else the config's, else hidden / heads."""
    for name in HEAD_DIM_ATTRS:
        value = vars(module).get(name)
        if isinstance(value, int) and value > 0:
            return value
    config = shared_config(config)
    value = getattr(config, "head_dim", None)
    return value if isinstance(value, int) and value > 0 else config.hidden_size // config.num_attention_heads


def fused_kv_heads(module: nn.Module, rows: int) -> int:
    """KV heads of a fused QKV projection with `rows` = heads + 2 KV heads head-sized row blocks:
    the module's own count, else its config's; multi-head attention when neither says otherwise."""
    for name in KV_HEAD_ATTRS:
        value = vars(module).get(name)
        if isinstance(value, int):
            return value
    config = getattr(module, "config", None)
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    return rows // 3 if kv is None or kv == heads else kv


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def trace_post_norms(model: nn.Module, block: nn.Module, plan: BlockPlan) -> BlockPlan:
    """Run two tokens up to the end of `block` and note which norm takes the attention output (O's
    output) or the FFN output (down's output) itself: those outputs are normalised before the
    residual add. On the meta device (weights still on disk, `offload=disk`) the trace runs on
    shapes alone; a model that cannot run there (GPT-2 reads a value) records no post-norms."""
    device = next(model.parameters()).device
    outputs: dict[str, torch.Tensor] = {}
    found: dict[str, str] = {}

    def record(part: str):
        def hook(module, args, output):
            outputs[part] = output
        return hook

    def check(path: str):
        def hook(module, args):
            for part, output in outputs.items():
                if args and args[0] is output:
                    found.setdefault(part, path)
        return hook

    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    with Hooks() as hooks:
        hooks.post(block.get_submodule(plan.o), record("attn")).post(block.get_submodule(plan.down), record("ffn"))
        hooks.post(block, stop_forward)
        for path, m in block.named_modules():
            if _is_norm(m):
                hooks.pre(m, check(path))
        try:
            with torch.inference_mode(), stops_forward():
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
        except Exception as e:
            if device.type == "meta":
                return plan
            raise UnsupportedModelError(f"block {type(block).__name__}: a forward pass of two tokens, run to find "
                                        f"its post-norms, failed: {type(e).__name__}: {str(e).strip()[:200]}") from e
    return replace(plan, attn_post_norm=found.get("attn"), ffn_post_norm=found.get("ffn"))
