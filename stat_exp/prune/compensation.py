"""Sequential error compensation: corrections fitted to the dense model's outputs.

With `calib.propagate=pruned` a block sees the pruned model's inputs, which already carry the
error of the blocks pruned before it. Fitting its correction to reproduce its *own* output on
those inputs (plain STAT) carries that error on; fitting it to the *dense* model's output on the
same tokens compensates it. For a prunable input with pruned activations Z~ and dense ones Z on
the same tokens, and output weights W, the kept units K get new output weights

    W'_K^T = argmin ||Z~_K W'_K^T - Z W^T||^2 = (G~_KK + ridge diag(G~_KK))^-1 C_K: W^T,

with G~ = Z~^T Z~ and the cross Gram C = Z~^T Z. In a nested unit order with the Cholesky factor
R of G~, M = R^-T C W^T gives every keep-count at once: W'_K^T = R_11^-1 M[:k], and the error
||Z W^T||^2 - ||M[:k]||^2 falls by the squared row norms of M. When Z~ = Z (nothing upstream was
pruned), C = G~, M = R W^T, and this is exactly STAT's interpolative fold.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stat_exp.prune.correction import ridged_cholesky
from stat_exp.prune.folds import channels
from stat_exp.prune.scores import AttentionLevel


class CompensatedFold:
    """Output weights fitted to the dense targets, for every keep-count of one unit order."""

    def __init__(self, gram: torch.Tensor, cross: torch.Tensor, W: torch.Tensor, weights: torch.Tensor,
                 perm: torch.Tensor, ridge: float = 0.0):
        """gram: Z~^T Z~, cross: Z~^T Z (original unit order), W: output weights (d_out x m), weights:
        column weights of the order, perm: the unit order."""
        w = weights[perm]
        self.perm, self.w = perm, w
        self.R = ridged_cholesky((gram * weights[:, None] * weights[None, :])[perm][:, perm], ridge)
        target = (weights[:, None] * (cross @ W.T))[perm]  # (D C W^T) in the order: weighted regressors
        self.M = torch.linalg.solve_triangular(self.R.T, target, upper=False)

    def cost(self) -> torch.Tensor:
        """E[k] - E[m] for k = 0..m: how much worse keeping k units fits the dense targets than keeping all."""
        rows = self.M.square().sum(1)
        tail = torch.flip(torch.cumsum(torch.flip(rows, [0]), 0), [0])
        return torch.cat([tail, tail.new_zeros(1)])

    def fitted(self, k: int) -> torch.Tensor:
        """W'_K (d_out x k), columns in the order's first k units."""
        B = torch.linalg.solve_triangular(self.R[:k, :k], self.M[:k], upper=True)
        return (self.w[:k, None] * B).T

    def weight(self, out: nn.Linear, k: int) -> tuple[torch.Tensor, None]:
        """W'_K in `out`'s dtype (refitted even when every unit stays: the inputs still differ)."""
        return self.fitted(k).to(out.weight.dtype), None


@dataclass
class CompensatedHeadFold:
    """O refitted to the dense outputs on each level's kept channels; `errors`: each level's error
    against the dense outputs, relative to keeping every head."""

    gram: torch.Tensor
    cross: torch.Tensor
    levels: list[AttentionLevel]
    num_heads: int
    head_dim: int
    ridge: float
    errors: torch.Tensor

    def cost(self) -> torch.Tensor:
        return self.errors

    def weight(self, out: nn.Linear, k: int) -> tuple[torch.Tensor, None]:
        """W'_K of the level's kept channels (also when every head stays: the pruned inputs still
        differ from the dense ones)."""
        kept, _ = channels(self.levels[k], self.num_heads, self.head_dim, self.gram.device)
        W = out.weight.detach().double().to(self.gram.device)
        return compensated_weight(self.gram, self.cross, W, kept, self.ridge).to(out.weight.dtype), None


def compensated_weight(gram: torch.Tensor, cross: torch.Tensor, W: torch.Tensor, kept: torch.Tensor,
                       ridge: float = 0.0) -> torch.Tensor:
    """W'_K (d_out x |K|) for an arbitrary kept set (heads: a level's channels)."""
    R = ridged_cholesky(gram[kept][:, kept], ridge)
    return torch.cholesky_solve(cross[kept] @ W.T, R, upper=True).T


def compensated_error(gram: torch.Tensor, cross: torch.Tensor, W: torch.Tensor, kept: torch.Tensor,
                      ridge: float = 0.0) -> float:
    """-||R^-T C_K: W^T||^2: the kept set's error up to a constant of the layer (lower is better)."""
    R = ridged_cholesky(gram[kept][:, kept], ridge)
    return -float(torch.linalg.solve_triangular(R.T, cross[kept] @ W.T, upper=False).square().sum())
