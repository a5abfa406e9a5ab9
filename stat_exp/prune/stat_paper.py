"""`stat_paper`: STAT as the authors' released code runs it, for reproducing the paper's tables.

`pruner=stat` is this project's own STAT (one global price per FLOP on exact output errors). This
module follows instead the authors' scripts, repository nicolehao34/InterpolativeDecompositionPruning,
folder bert-pruning-ID: `prune_bert.py` (BERT, DistilBERT; the `bert` procedure) and `prune_opt.py`
(OPT; the `opt` procedure). Both are single `main()` scripts; the steps below name the block of code
each one follows. The interpolative decompositions themselves are this project's shared ones
(`stat_exp.factorize`: the same pivots and R as their LAPACK geqp3 calls, from any backend), and the
folds into the next weights are `StatPruner.apply`'s.

1. Two passes over the calibration data, FFN neurons first (prune_bert.py: the "SAVE R,P BLOCK",
   then `calculate(model)` once on the dense model; the FFN pruning loop; `calculate(model)` again
   on the FFN-pruned model; the "HEADS BLOCK"). Stage `ffn` streams the dense model, scores heads
   and neurons, decides every layer's head and neuron counts and prunes the FFNs; stage `heads`
   streams the FFN-pruned model and recomputes the head factorisations there, then prunes the heads
   to the counts of stage `ffn` (prune_bert.py keeps the head errors of the first `calculate` in
   memory, `headsErr`; the second call only refreshes the saved factors). prune_opt.py takes the head
   factors from the same dense pass as the neurons: `recompute_heads=false` runs that one pass.
2. Neurons (prune_bert.py "SAVE R,P BLOCK"; prune_opt.py "Generate Rs"): the FFN hidden activations,
   columns scaled by the norms of their output weights, factored by column-pivoted QR; the pivot
   magnitudes |R_jj| are the neuron errors, ||R[k:, k:]||_F the error of keeping k.
3. Heads (prune_bert.py `calculate`; prune_opt.py the loop over `ZHead`/`Zneuron`): pivoted QR of the
   matrix whose column h is head h's raw output (before W_O, unweighted), over tokens x head_dim;
   the channels in that head order, unpivoted QR, R1; the error of keeping the first i heads is
   ||Q1[:, i*dh:] R1[i*dh:, i*dh:] W_O^T||_F. Their code reorders the residual's columns with the
   head permutation P where its inverse argsort(P) is meant (the `sort` they compute goes unused),
   so W_O meets the wrong channels; we compute the intended error, the residual against the W_O
   columns of the same channels (`Factorization.output_error`). Grouped-query attention (not in their
   code): `per_group` ranks single heads; `whole_groups` ranks KV groups, a group's column stacking
   its heads' outputs.
4. Per-layer weighting of the errors (prune_bert.py before "Finally to the main loop"; prune_opt.py
   after "END Generate Rs"). `bert`: neuron and head errors times c_l = sqrt(L + 1 - l) + 1 (l from 0),
   which protects early layers. `opt`: each layer's neuron errors divided by exp(a x + b), the
   least-squares line through log |R_11| of the layers x = 1..L; head errors likewise through the
   error of keeping no head, then times 1.125^(H - i) for keeping i heads. `procedure=auto` uses
   `bert` for encoders and `opt` for every decoder family: the authors released no other decoder
   procedure, and theirs for OPT is the one written for causal language models.
5. The split between heads and neurons (`neurons()` and the loop over `head` in both scripts): for
   each average head count per layer from int(mu H) to H, the heads are the head*L largest weighted
   head errors (per layer, the number of its errors above that cutoff), the neurons fill the FLOPs
   left (the same count per layer on average, rounded down, taken as the N*L largest weighted neuron
   errors); the head count chosen is the one whose head cutoff is closest to twice the mean over
   layers of ||R22||_F of the neurons removed. The neuron count is then the mean of that candidate's
   per-layer counts, rounded down, and the neurons are thresholded again for it. Their FLOPs shares
   (`headsWeight`/`neuronWeight`, set by hand) come here from the FLOPs model at `budget.seq_len`
   (for BERT exactly Kwon et al.'s 6144 / (9216 + 2s)); with uniform layers the arithmetic is theirs.
   Their cutoffs: prune_bert.py keeps heads with error >= the (head*L)-th largest, prune_opt.py those
   > the (head*L+1)-th; neurons in both > the (N*L+1)-th (where every neuron fits, their indexing
   fails; all are kept here).
6. Folds (FFN loop and "HEADS BLOCK"): keep the pivoted neurons, W2 <- W2 T^T with T from R11^-1 R12
   un-scaled by the output-weight norms; keep the pivoted heads' Q/K/V rows, W_O <- W_O T^T with T the
   block least-squares map R1_11^-1 R1_12 from the kept heads' channels to the removed ones (their
   head-level T is overwritten by it for every removed head). Their pinv of R11 is a triangular solve
   truncated at the numerical rank here.
As released (`as_released=true`, or one switch per difference): `head_error=released` prices the
head errors as their scripts do, the residual's columns reordered by P where argsort(P) is meant
(the intended error with W_O's columns permuted twice by argsort(P)); `flops_shares=released` splits
the budget with their hand-set neuron share (prune_bert.py 0.6622759267443489, prune_opt.py 4/7) at
the candidate average head count: N = int((mu - (1 - share) h / H) / share x width) neurons per layer.
`sketch=released` (with as_released, for the opt procedure) feeds the statistics prune_opt.py's
unnormalised 100-row Gaussian sketch of every calibration batch (`released_sketch`).
`recompute_heads` defaults to the procedure's own: two passes for `bert`, one for `opt`.
Beyond their code, every layer keeps at least one head (one attention level) and one neuron option
(`budget.round_to`), as the shared allocation does; the budget's `allocation` does not apply (their
thresholds are global by construction).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from stat_exp.calibrate import LayerStats
from stat_exp.errors import ConfigError
from stat_exp.factorize.base import Accumulator, Backend, pivoted_cholesky
from stat_exp.models.base import ModelAdapter
from stat_exp.models.flops import FlopsModel, LayerShape
from stat_exp.prune.budget import BudgetError, BudgetSpec, LayerPlan, neuron_options
from stat_exp.prune.folds import PivotedFold, PivotedHeadFold, StatFolds
from stat_exp.prune.scores import LayerScores, attention_levels, attention_units
from stat_exp.prune.released_sketch import sketched
from stat_exp.prune.stat import JITTER, StatPruner, StatState, nested_head_factor

PROCEDURES = ("auto", "bert", "opt")
RELEASED_NEURON_SHARE = {"bert": 0.6622759267443489, "opt": 4 / 7}  # neuronWeight of prune_bert.py / prune_opt.py
SPLIT_RATIO = 2.0  # head cutoff closest to SPLIT_RATIO x the mean neuron residual (both scripts)
HEAD_LEVEL_BASE = 1.125  # prune_opt.py: the error of keeping i of H heads times 1.125^(H - i)


@dataclass
class StatPaperState(StatState):
    """STAT's state and, from a pass that scores the neurons, what the authors' weighting reads:
    the neuron pivots |R_jj| and the head error of keeping no head."""

    pivots: np.ndarray | None = None
    no_heads: float | None = None


@dataclass
class FinalFfn:
    """The FFN in stage `heads`: pruned and folded in stage `ffn`, kept as it is."""

    width: int

    def cost(self) -> torch.Tensor:
        return torch.zeros(self.width + 1, dtype=torch.float64)

    def weight(self, out: nn.Linear, k: int) -> tuple[None, None]:
        return None, None


def raw_unit_gram(G: torch.Tensor, units: list[list[int]], head_dim: int) -> torch.Tensor:
    """Gram of the raw head outputs, one column per unit: C[a, b] = sum over tokens and positions
    of <unit a's output, unit b's output>, a unit's heads stacked in order (G: head-channel Gram)."""
    H = G.shape[0] // head_dim
    per_head = torch.einsum("atbt->ab", G.reshape(H, head_dim, H, head_dim))
    U = torch.tensor(units, device=G.device)
    return sum(per_head[U[:, j]][:, U[:, j]] for j in range(U.shape[1]))


def released_out_weight(W_O: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """W_O with its columns permuted as the released head error meets them: their residual, in the
    pivoted channel order `perm`, is reordered by `perm` itself where argsort(perm) restores the
    model's order, so `Factorization.output_error` of this weight is their error."""
    inverse = torch.argsort(perm)
    return W_O[:, inverse[inverse]]


def released_neurons_per_layer(target: float, share: float, average_heads: int, max_heads: int, width: int) -> int:
    """The neurons per layer the released `neurons()` affords at `average_heads` of `max_heads`
    heads with the hand-set FLOPs share of the neurons (0 when the heads take the whole budget)."""
    return max(0, int((target - (1 - share) * (average_heads / max_heads)) / share * width))


def _line_fit(values: np.ndarray) -> np.ndarray:
    """exp(a x + b) at x = 1..L for the least-squares line through log(values) (prune_opt.py)."""
    logs = np.log(np.maximum(values, np.finfo(float).tiny))
    if len(values) < 2:
        return np.exp(logs)
    x = np.arange(1, len(values) + 1)
    a, b = np.polyfit(x, logs, deg=1)
    return np.exp(a * x + b)


def weighted_errors(scores: list[LayerScores], procedure: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(neuron errors, head errors) per layer after the procedure's per-layer weighting.

    Neuron errors are the pivots |R_jj|; head errors are the errors of keeping i attention levels,
    i = 0 .. n_levels - 1 (keeping all costs nothing and is not an entry, as in their arrays)."""
    neurons = [sc.state.pivots for sc in scores]
    heads = [np.concatenate([[sc.state.no_heads], sc.attn_cost[:-1]]) for sc in scores]
    L = len(scores)
    if procedure == "bert":
        c = np.sqrt(np.arange(L, 0, -1) + 1.0) + 1.0
        return [e * w for e, w in zip(neurons, c)], [e * w for e, w in zip(heads, c)]
    neuron_fit = _line_fit(np.array([e[0] for e in neurons]))
    head_fit = _line_fit(np.array([e[0] for e in heads]))
    levels = [HEAD_LEVEL_BASE ** np.arange(len(e), 0, -1) for e in heads]
    return ([e / f for e, f in zip(neurons, neuron_fit)],
            [e / f * w for e, f, w in zip(heads, head_fit, levels)])


def top_counts(errors: list[np.ndarray], total: int, inclusive: bool) -> tuple[np.ndarray, float]:
    """Per-layer counts of the errors above the cutoff that keeps `total` of them, and the cutoff.

    inclusive: errors >= the total-th largest (prune_bert.py's heads); else errors > the
    (total+1)-th largest (prune_opt.py's heads, both scripts' neurons). Keeping all: cutoff 0."""
    flat = np.sort(np.concatenate(errors))[::-1]
    if total >= len(flat):
        return np.array([len(e) for e in errors]), 0.0
    cutoff = float(flat[total - 1] if inclusive else flat[total])
    return np.array([int((e >= cutoff).sum() if inclusive else (e > cutoff).sum()) for e in errors]), cutoff


def paper_plans(scores: list[LayerScores], shapes: list[LayerShape], flops: FlopsModel, target: float,
                procedure: str, round_to: int = 1, neuron_share: float | None = None) -> list[LayerPlan]:
    """Every layer's head level and neuron count by the authors' thresholds and split (step 5);
    `neuron_share`: their hand-set FLOPs share of the neurons instead of the FLOPs model's."""
    if procedure not in ("bert", "opt"):
        raise ValueError(f"procedure={procedure!r}; allowed: bert, opt")
    neuron_err, head_err = weighted_errors(scores, procedure)
    L = len(scores)
    dense = sum(flops.dense(s) for s in shapes)
    floor = sum(flops.attention(sh, sc.attn_levels[0].num_heads, sc.attn_levels[0].num_kv_heads)
                + flops.ffn(sh, int(neuron_options(sh.ffn_width, round_to)[0])) for sc, sh in zip(scores, shapes))
    if floor > target * dense * 1.0000001:
        raise BudgetError(f"budget.flops={target} is below the smallest reachable fraction {floor / dense:.3f} "
                          f"(one attention level and {max(1, round_to)} neurons per layer)")
    per_neuron = sum(flops.ffn(sh, 1) for sh in shapes)

    def heads_for(average: int) -> tuple[np.ndarray, float]:
        counts, cutoff = top_counts(head_err, average * L, inclusive=procedure == "bert")
        return np.maximum(counts, 1), cutoff

    most = max(len(e) for e in head_err)  # attention levels per layer (H under multi-head attention)

    def neurons_for(heads: np.ndarray, average: int) -> np.ndarray:
        if neuron_share is not None:
            n = released_neurons_per_layer(target, neuron_share, average, most, shapes[0].ffn_width)
            return top_counts(neuron_err, n * L, inclusive=False)[0]
        attention = sum(flops.attention(sh, sc.attn_levels[h - 1].num_heads, sc.attn_levels[h - 1].num_kv_heads)
                        for sc, sh, h in zip(scores, shapes, heads))
        left = target * dense - attention
        return top_counts(neuron_err, int(left / per_neuron) * L if left > 0 else 0, inclusive=False)[0]

    candidates = []
    for average in range(max(1, int(target * most)), most + 1):
        heads, cutoff = heads_for(average)
        neurons = neurons_for(heads, average)
        residual = float(np.mean([sc.ffn_cost[k] for sc, k in zip(scores, neurons)]))
        candidates.append((abs(cutoff - SPLIT_RATIO * residual), average, heads, neurons))
    _, _, heads, neurons = min(candidates, key=lambda c: c[0])  # first of equals, as np.argmin
    neurons = top_counts(neuron_err, int(np.mean(neurons)) * L, inclusive=False)[0]
    return [LayerPlan(int(h) - 1, _snap(int(k), sh.ffn_width, round_to)) for h, k, sh in zip(heads, neurons, shapes)]


def _snap(k: int, width: int, round_to: int) -> int:
    """The neuron option nearest to k (at least the first: every layer keeps some neurons)."""
    options = neuron_options(width, round_to)
    return int(options[np.argmin(np.abs(options - k))])


class StatPaperPruner(StatPruner):
    """The authors' procedure (see the module docstring); the correction folds are StatPruner's."""

    name = "stat_paper"

    def __init__(self, gqa: Literal["per_group", "whole_groups"] = "per_group", correction: bool = True,
                 procedure: Literal["auto", "bert", "opt"] = "auto", recompute_heads: bool | None = None,
                 as_released: bool = False, head_error: Literal["intended", "released"] | None = None,
                 flops_shares: Literal["derived", "released"] | None = None,
                 sketch: Literal["exact", "released"] | None = None):
        """`procedure`: whose weighting and cutoffs (auto: bert for encoders, opt for decoders);
        `recompute_heads`: factor heads again on the FFN-pruned model (prune_bert.py) or take them
        from the dense pass (prune_opt.py); None: the procedure's own. `as_released`: the default of
        the switches below; `head_error`: the intended head error or the released one; `flops_shares`:
        the neurons' FLOPs share from the FLOPs model or the scripts' hand-set values; `sketch`: exact
        statistics or prune_opt.py's Gaussian sketch of every batch (None: released for the opt
        procedure when as_released, prune_bert.py has none)."""
        super().__init__(gqa, correction, allocation="global")
        if procedure not in PROCEDURES:
            raise ConfigError(f"pruner.procedure={procedure!r}; allowed: {', '.join(PROCEDURES)}")
        self.procedure, self.recompute_heads = procedure, recompute_heads
        self.head_error = head_error or ("released" if as_released else "intended")
        self.flops_shares = flops_shares or ("released" if as_released else "derived")
        self.as_released, self.sketch = as_released, sketch
        self._sketch = sketch or "exact"
        self._resolved = procedure
        self._set_stages()
        self._head_levels: dict[int, int] = {}  # decided in stage ffn, applied in stage heads

    def _set_stages(self) -> None:
        recompute = self.recompute_heads if self.recompute_heads is not None else self._resolved != "opt"
        self.stages = ("ffn", "heads") if recompute else ("all",)
        self._stage = self.stages[0]

    @property
    def variant(self) -> str:
        parts = [super().variant, f"{self.procedure} procedure" if self.procedure != "auto" else "",
                 {True: "heads recomputed", False: "heads from the dense pass", None: ""}[self.recompute_heads],
                 "released head error" if self.head_error == "released" else "",
                 "released FLOPs shares" if self.flops_shares == "released" else "",
                 "released sketch" if self.sketch == "released" else ""]
        return ", ".join(p for p in parts if p)

    def prepare(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                examples: list[dict[str, torch.Tensor]] | None = None) -> None:
        if self.procedure == "auto":
            self._resolved = "opt" if adapter.causal else "bert"
        self._sketch = self.sketch or ("released" if self.as_released and self._resolved == "opt" else "exact")
        if self.head_error == "released" and self.gqa != "per_group":
            raise ConfigError("pruner.head_error=released ranks single heads: it needs pruner.gqa=per_group")
        self._set_stages()

    def accumulator(self, backend: Backend) -> Callable[[int], Accumulator]:
        return sketched(backend.accumulator) if self._sketch == "released" else backend.accumulator

    def begin_stage(self, stage: str) -> None:
        self._stage = stage

    def score(self, adapter: ModelAdapter, index: int, layer: nn.Module,
              stats: LayerStats | None) -> LayerScores[StatPaperState, StatFolds]:
        attn, ffn = adapter.attention(layer), adapter.ffn(layer)
        attn_fact, levels, bounds = self._head_factorization(attn, stats.attn_factor.gram())
        W_O = attn.o.weight.detach().double()
        if self.head_error == "released":
            W_O = released_out_weight(W_O, attn_fact.perm)
        head_err = attn_fact.output_error(W_O).sqrt().cpu()
        heads = PivotedHeadFold(attn_fact, levels, attn.head_dim, head_err[bounds], self.correction)
        attn_cost = heads.cost().numpy()
        if self._stage == "heads":  # the FFN is final: only the head factors are new
            final = FinalFfn(ffn.width)
            return LayerScores(ffn_order=torch.arange(ffn.width), ffn_cost=final.cost().numpy(),
                               attn_levels=levels, attn_cost=attn_cost,
                               state=StatPaperState(stats.n_tokens), heavy=StatFolds(final, heads))
        W2 = ffn.down.weight.detach().double()  # the factorizations stay on the statistics' device
        ffn_fact = stats.ffn_factor.factorize(weights=W2.norm(dim=0))
        rows = ffn_fact.R.square().sum(1)  # ||R[k:, k:]||_F^2 = sum of the squared rows k.. (R upper triangular)
        residual = torch.cat([torch.flip(torch.cumsum(torch.flip(rows, [0]), 0), [0]), rows.new_zeros(1)]).sqrt()
        state = StatPaperState(stats.n_tokens, pivots=ffn_fact.R.diagonal().abs().cpu().numpy(),
                               no_heads=float(head_err[0]))
        folds = StatFolds(PivotedFold(ffn_fact, residual, self.correction), heads)
        return LayerScores(ffn_order=ffn_fact.perm.cpu(), ffn_cost=residual.cpu().numpy(), attn_levels=levels,
                           attn_cost=attn_cost, state=state, heavy=folds)

    def _head_factorization(self, attn, G: torch.Tensor):
        """Heads ranked by pivoting on their raw outputs (step 3); the nested channel factor as STAT's."""
        units = attention_units(attn.num_heads, attn.num_kv_heads, self.gqa)
        C = raw_unit_gram(G, units, attn.head_dim)
        eye = torch.eye(len(units), dtype=C.dtype, device=C.device)
        unit_order, _ = pivoted_cholesky(C + JITTER * float(C.trace()) * eye)
        levels = attention_levels(unit_order.tolist(), attn.num_heads, attn.num_kv_heads, self.gqa)
        fact, bounds = nested_head_factor(levels, G, attn.head_dim)
        return fact, levels, bounds

    def fixed_plans(self, layers: list[int], scores: list[LayerScores], shapes: list[LayerShape],
                    flops: FlopsModel, budget: BudgetSpec) -> list[LayerPlan]:
        """Stage ffn: decide heads and neurons, cut only neurons; stage heads: cut the heads decided."""
        if self._stage == "heads":
            return [LayerPlan(self._head_levels[i], sh.ffn_width) for i, sh in zip(layers, shapes)]
        share = RELEASED_NEURON_SHARE[self._resolved] if self.flops_shares == "released" else None
        plans = paper_plans(scores, shapes, flops, budget.flops, self._resolved, budget.round_to, share)
        if self._stage == "all":
            return plans
        self._head_levels = {i: p.attn_level for i, p in zip(layers, plans)}
        return [LayerPlan(len(sc.attn_levels) - 1, p.neurons) for sc, p in zip(scores, plans)]
