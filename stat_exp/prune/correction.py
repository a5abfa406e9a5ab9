"""The least-squares correction STAT folds into a layer's output weights, from Gram statistics.

For units in an order (most important first) and a keep-count k, the removed units' activations
are predicted from the kept ones, Z_r ~= Z_k T, and W_k <- W_k + W_r T^T is folded into the output
projection. A ridge shrinks T toward 0 (plain slicing), T = (G_kk + ridge diag(G_kk))^-1 G_kr, a
penalty relative to each unit's own energy so it does not depend on the activation scale or the
token count's units. One Cholesky factor R of G + ridge diag(G), in that order, gives T for every
k (the ridge is diagonal: the off-diagonal blocks are G's own).

The output error of every keep-count, measured on any Gram G_e (the fit's own, or one of
held-out tokens), comes from the same R: with Y = Z_e R^-1, the residual of keeping k units is
Y[:, k:] R[k:, k:], so E[k] = sum_{i,j>=k} H_ij (U U^T)_ij with H = R^-T G_e R^-1, U = R V^T.

An intercept (mean term) fits Z_r ~= Z_k T + 1 c^T: the same algebra on Grams centred by the fit's
channel means, with c = mu_r - T^T mu_k folded into the output bias, b <- b + W_r c.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stat_exp.factorize.base import row_blocks, weighted_gram

JITTER = 1e-10  # smallest relative diagonal lift, for Grams of collinear or dead units
SINGULAR_JITTER = 1e-6  # the first lift tried for a Gram of fewer tokens than units (see ridged_cholesky)


def ridged_cholesky(G: torch.Tensor, ridge: float = 0.0, tokens: int | None = None) -> torch.Tensor:
    """Upper R with R^T R = G + ridge diag(G) + eps mean(diag(G)) I, the smallest eps from JITTER
    up that succeeds: a rank-deficient Gram (few tokens, dead units, float32 blocks) still factors.

    `tokens`: how many tokens G sums, where the caller knows. Fewer than G's units and no ridge
    make G singular, and the ladder then starts at SINGULAR_JITTER: from JITTER it failed at 1e-10
    and 1e-8 on the fit Gram of a 7B-shaped FFN (8,448 tokens, 11,008 units), each failure a whole
    factorization, since it surfaces only at the column past the rank.
    """
    scale = max(float(G.diagonal().mean()), 1e-300)
    base = G + torch.diag(ridge * G.diagonal()) if ridge else G
    eps = SINGULAR_JITTER if tokens is not None and tokens < G.shape[0] and not ridge else JITTER
    while True:
        A = base.clone()
        A.diagonal().add_(eps * scale)  # the lift in place: no m x m identity beside G
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return L.T
        del A, L
        eps *= 100


def error_curve(R: torch.Tensor, V: torch.Tensor, G_eval: torch.Tensor) -> torch.Tensor:
    """E[k] = ||(Z_r - Z_k T_k) V_r^T||_F^2 on the tokens of G_eval, for k = 0..m.

    R: the fit's upper factor, V: output weights (d_out x m), G_eval: a Gram; all in the unit order.
    E[k] sums H o (U U^T) over its trailing k.. block, which reads only upper triangles: they are
    formed in row blocks of R, skipping what lies below the diagonal (about 35% fewer flops than
    the full products on a 7B's FFN, and no m x m U U^T held).
    """
    m = R.shape[0]
    U = torch.cat([R[rows, rows.start:] @ V.T[rows.start:] for rows in row_blocks(m)]) if m else V.T
    H = _congruence_upper(R, G_eval)
    step = H.new_zeros(m)  # row i's share of the trailing sums: C_ii + 2 sum_{j>i} C_ij
    for rows in row_blocks(m):
        i0, width = rows.start, rows.stop - rows.start
        C = H[rows, i0:].mul_(U[rows] @ U[i0:].T)
        step[rows] = C[:, :width].diagonal() + 2 * (C[:, :width].triu(1).sum(1) + C[:, width:].sum(1))
    tail = torch.flip(torch.cumsum(torch.flip(step, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)])


def _congruence_upper(R: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """R^-T G R^-1 on and above its diagonal blocks (below them: left over from the solve).

    The second triangular solve runs by row blocks, each over the columns right of its block's
    start only: that part of the upper triangle needs nothing below it (a third of a full solve).
    """
    H = torch.linalg.solve_triangular(R, G, upper=True, left=False)  # G R^-1
    for rows in row_blocks(R.shape[0]):
        i0 = rows.start
        if i0:
            H[rows, i0:] -= R[:i0, rows].T @ H[:i0, i0:]
        H[rows, i0:] = torch.linalg.solve_triangular(R[rows, rows].T, H[rows, i0:], upper=False)
    return H


def centred(G: torch.Tensor, sums: torch.Tensor, n: int, mean: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t (z_t - mu)(z_t - mu)^T from G = sum z z^T and sums = sum z over n tokens; mu defaults
    to these tokens' own mean (for held-out tokens, pass the fit's mean)."""
    mu = sums / max(n, 1) if mean is None else mean
    return G - torch.outer(sums, mu) - torch.outer(mu, sums) + n * torch.outer(mu, mu)


@dataclass
class ModuleGrams:
    """One prunable input's calibration statistics: the Gram over all tokens (and channel sums for
    an intercept), and, when a choice needs validation, the same split into fit and held-out parts."""

    full: torch.Tensor
    n: int
    sums: torch.Tensor | None = None
    fit: torch.Tensor | None = None
    held_out: torch.Tensor | None = None
    held_out_sums: torch.Tensor | None = None
    n_held_out: int = 0

    @property
    def mean(self) -> torch.Tensor | None:
        return None if self.sums is None else self.sums / max(self.n, 1)

    def centred(self) -> "ModuleGrams":
        """The same statistics about the fit's means (the held-out part about the fit part's mean)."""
        if self.sums is None:
            return self
        full = centred(self.full, self.sums, self.n)
        if self.fit is None:
            return ModuleGrams(full, self.n, self.sums)
        fit_sums, n_fit = self.sums - self.held_out_sums, self.n - self.n_held_out
        fit_mean = fit_sums / max(n_fit, 1)
        return ModuleGrams(full, self.n, self.sums, centred(self.fit, fit_sums, n_fit),
                           centred(self.held_out, self.held_out_sums, self.n_held_out, fit_mean),
                           self.held_out_sums, self.n_held_out)

    def scaled(self, w: torch.Tensor, perm: torch.Tensor) -> "ModuleGrams":
        """Column weights w, then units in the order perm (sums follow)."""
        def f(G):
            return None if G is None else weighted_gram(G, w, perm)

        def v(s):
            return None if s is None else (s * w)[perm]
        return ModuleGrams(f(self.full), self.n, v(self.sums), f(self.fit), f(self.held_out), v(self.held_out_sums),
                           self.n_held_out)
