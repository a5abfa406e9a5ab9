"""STAT's corrections as strategies: each prices every keep-count of one prunable input and folds one.

A layer's two folds (FFN neurons, attention levels) are chosen once, when the layer is scored, by
what its statistics and the pruner's options ask for (`StatPruner._scores`):
- pivoted (the method as published): one pivoted factor per module, its suffix sums the costs and
  R11^-1 R12 the fold (`PivotedFold`, `PivotedHeadFold`);
- options (ridge, intercept, held-out choices, greedy heads): a ridge chosen per keep-count and a
  mean term folded into the output bias (`NeuronFold`, `HeadFold`);
- compensated (blocks fed the pruned model's inputs): refitted to the dense model's outputs
  (`compensation.CompensatedFold`, `compensation.CompensatedHeadFold`).
They are the heavy state of STAT's `LayerScores` (`StatFolds`), and `apply` asks them for the
corrected weights without knowing which they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from stat_exp.factorize.base import Factorization
from stat_exp.prune.correction import ridged_cholesky
from stat_exp.prune.head_selection import fold_map
from stat_exp.prune.scores import AttentionLevel
from stat_exp.prune.surgery import head_channels


class Fold(Protocol):
    """The correction of one prunable input: FFN neurons in the fold's order, or attention levels."""

    def cost(self) -> torch.Tensor:
        """What each keep-count costs before it is priced into the residual stream (STAT: the output
        error the corrected module adds): neurons k = 0..m, or one entry per attention level."""
        ...

    def weight(self, out: nn.Linear, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weight, bias) of the output projection `out` keeping the first k neurons (heads: level
        k), columns in the kept units' order; None where `out`'s own, sliced, stands."""
        ...


@dataclass
class StatFolds:
    """STAT's heavy state of one layer: the folds of its FFN and of its attention."""

    ffn: Fold
    attn: Fold


def corrected_weight(weight: torch.Tensor, fact: Factorization, k: int, correct: bool) -> torch.Tensor | None:
    """W[:, kept] + W[:, removed] T^T, the output weights with the removed units folded in (None
    without correction, or when nothing is removed)."""
    if not correct or k >= weight.shape[1]:
        return None
    W = weight.detach().double().to(fact.R.device)
    kept, removed = fact.perm[:k], fact.perm[k:]
    return (W[:, kept] + W[:, removed] @ fact.correction(k).T).to(weight.dtype)


@dataclass
class PivotedFold:
    """Neurons by the pivoted factor: the first k pivots kept, T = R11^-1 R12 folded in.
    `errors`: each count's cost as the pruner priced it (zeros where it did not)."""

    fact: Factorization
    errors: torch.Tensor
    correct: bool = True

    @property
    def perm(self) -> torch.Tensor:
        return self.fact.perm

    def cost(self) -> torch.Tensor:
        return self.errors

    def weight(self, out: nn.Linear, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return corrected_weight(out.weight, self.fact, k, self.correct), None


@dataclass
class PivotedHeadFold:
    """Head levels by one factor of the head channels in the levels' nested order, so that a level
    keeps a prefix of its channels; `errors`: each level's cost as the pruner priced it."""

    fact: Factorization
    levels: list[AttentionLevel]
    head_dim: int
    errors: torch.Tensor
    correct: bool = True

    def cost(self) -> torch.Tensor:
        return self.errors

    def weight(self, out: nn.Linear, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        level = self.levels[k]
        n = level.num_heads * self.head_dim
        o_weight = corrected_weight(out.weight, self.fact, n, self.correct)
        if o_weight is None:
            return None, None
        # columns follow the factor's order; put them in kept-head order
        where = {c: i for i, c in enumerate(self.fact.perm[:n].tolist())}
        return o_weight[:, [where[int(c)] for c in head_channels(level.heads, self.head_dim)]], None


@dataclass
class NeuronFold:
    """The FFN correction of every keep-count: unit order, column weights, the weighted Gram in that
    order (centred with an intercept), the ridge chosen for each count, the channel means; `errors`:
    each count's cost (None for a fold built for its corrections alone)."""

    perm: torch.Tensor
    weights: torch.Tensor
    gram: torch.Tensor
    ridge_at: list[float]
    mean: torch.Tensor | None
    errors: torch.Tensor | None = None
    correct: bool = True

    def correction(self, k: int) -> torch.Tensor:
        """T (k x m-k) in the original (unweighted) scale, with the ridge chosen for k."""
        R = ridged_cholesky(self.gram, self.ridge_at[k])
        return Factorization(perm=self.perm, R=R, weights=self.weights).correction(k)

    def cost(self) -> torch.Tensor:
        assert self.errors is not None, "a fold built without its costs"
        return self.errors

    def weight(self, out: nn.Linear, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.correct or k >= out.in_features:
            return None, None
        W = out.weight.detach().double().to(self.gram.device)
        kept, removed = self.perm[:k], self.perm[k:]
        T = self.correction(k)
        return (W[:, kept] + W[:, removed] @ T.T).to(out.weight.dtype), \
            folded_bias(out, W[:, removed], self.mean, kept, removed, T)


@dataclass
class HeadFold:
    """The attention correction of every level: the head-channel Gram (centred with an intercept),
    the ridge chosen for each level, the channel means, each level's cost."""

    gram: torch.Tensor
    levels: list[AttentionLevel]
    num_heads: int
    head_dim: int
    ridges: list[float]
    mean: torch.Tensor | None
    errors: torch.Tensor
    correct: bool = True

    def cost(self) -> torch.Tensor:
        return self.errors

    def weight(self, out: nn.Linear, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        level = self.levels[k]
        if not self.correct or level.num_heads == self.num_heads:
            return None, None
        kept, removed = channels(level, self.num_heads, self.head_dim, self.gram.device)
        T = fold_map(self.gram, kept, removed, self.ridges[k])
        W = out.weight.detach().double().to(T.device)
        return (W[:, kept] + W[:, removed] @ T.T).to(out.weight.dtype), \
            folded_bias(out, W[:, removed], self.mean, kept, removed, T)


def channels(level: AttentionLevel, num_heads: int, head_dim: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, removed) O-input channels of a level, on `device`."""
    kept = head_channels(level.heads, head_dim)
    removed = head_channels(sorted(set(range(num_heads)) - set(level.heads)), head_dim)
    return kept.to(device), removed.to(device)


def folded_bias(linear: nn.Linear, W_removed: torch.Tensor, mean: torch.Tensor | None, kept: torch.Tensor,
                removed: torch.Tensor, T: torch.Tensor) -> torch.Tensor | None:
    """b + W_r (mu_r - T^T mu_k): the intercept of the fit, or None without one."""
    if mean is None:
        return None
    bias = W_removed @ (mean[removed] - T.T @ mean[kept])
    return bias if linear.bias is None else bias + linear.bias.detach().double().to(bias.device)
