"""Which heads STAT keeps: chosen for the error the corrected layer actually pays.

The correction reconstructs the removed heads' channels from all kept channels, so the price of a
layout is the corrected error after W_O, E(K) = tr(W_S (G_SS - G_SK T) W_S^T) with
T = (G_KK + ridge diag(G_KK))^-1 G_KS (S: removed channels, K: kept, G: their Gram). Ranking heads
by one vector per head (their whole contribution after W_O) ignores that a head whose output the
others can reproduce costs nothing once corrected. `greedy_levels` removes, level by level, the
head (per KV group under `per_group`) or unit whose removal adds the least corrected error.
"""
from __future__ import annotations

import torch

from stat_exp.prune.correction import ridged_cholesky
from stat_exp.prune.scores import AttentionLevel
from stat_exp.prune.surgery import head_channels


def fold_map(G: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """T (|kept| x |removed|) with Z_removed ~= Z_kept T: the (ridge) least squares from the Gram."""
    R = ridged_cholesky(G[kept][:, kept], ridge)
    return torch.cholesky_solve(G[kept][:, removed], R, upper=True)


def corrected_error(G: torch.Tensor, W: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor,
                    ridge: float = 0.0, G_eval: torch.Tensor | None = None) -> float:
    """||(Z_S - Z_K T) W_S^T||_F^2 for the fold T that `fold_map` fits on G, measured on the tokens
    of G_eval (default: G's own)."""
    if removed.numel() == 0:
        return 0.0
    E = G if G_eval is None else G_eval
    WS = W[:, removed]
    cov = E[removed][:, removed]
    if kept.numel():
        T = fold_map(G, kept, removed, ridge)
        cross = E[removed][:, kept] @ T
        cov = cov - cross - cross.T + T.T @ E[kept][:, kept] @ T
    return float(((WS @ cov) * WS).sum())


def greedy_levels(G: torch.Tensor, W: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                  per_group: bool) -> tuple[list[AttentionLevel], list[float]]:
    """Levels smallest first (dense last) and their corrected errors, by backward elimination.

    `per_group` (grouped-query attention): level r keeps r query heads in every KV group; each
    round removes one head from every group, the cheapest first. Otherwise the units are whole
    KV groups (single heads under multi-head attention), removed one at a time.
    The corrected error of removing channels S is tr(W_S (P_SS)^-1 W_S^T) with P = G^-1 (the
    Schur complement of G_KK is the inverse of the precision's S block), so each candidate costs
    one factor of the removed block, not of the kept one.
    """
    group = num_heads // num_kv_heads
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    P = torch.cholesky_inverse(ridged_cholesky(G), upper=True) if G.shape[0] else eye

    def error(heads: list[int]) -> float:
        removed = head_channels(sorted(set(range(num_heads)) - set(heads)), head_dim).to(G.device)
        if removed.numel() == 0:
            return 0.0
        WS = W[:, removed]
        L, info = torch.linalg.cholesky_ex(P[removed][:, removed])
        if int(info):  # numerically singular block: the direct fit
            kept = head_channels(sorted(heads), head_dim).to(G.device)
            return corrected_error(G, W, kept, removed)
        return float(torch.linalg.solve_triangular(L, WS.T, upper=False).square().sum())

    def level(heads: list[int]) -> AttentionLevel:
        return AttentionLevel(tuple(sorted(heads)), tuple(sorted({h // group for h in heads})))

    kept = list(range(num_heads))
    levels, costs = [level(kept)], [0.0]
    if per_group and group > 1:
        for _ in range(group - 1):
            open_groups = set(range(num_kv_heads))
            while open_groups:
                cost, head = min((error([h for h in kept if h != c]), c) for c in kept if c // group in open_groups)
                kept.remove(head)
                open_groups.discard(head // group)
            levels.append(level(kept))
            costs.append(cost)
    else:
        units = [list(range(g * group, (g + 1) * group)) for g in range(num_kv_heads)]
        while len(units) > 1:
            cost, unit = min((error([h for u in units if u is not c for h in u]), i) for i, c in enumerate(units))
            units.pop(unit)
            levels.append(level([h for u in units for h in u]))
            costs.append(cost)
    return levels[::-1], costs[::-1]
