"""Interpolative decomposition from a column-pivoted triangular factor.

Every backend ends in the same object: a pivot order `perm` and an upper-triangular `R` with
A[:, perm] = Q R for the (column-weighted) activation matrix A. Selection, correction and the
output-error curve below depend only on (perm, R), so they are shared by all backends.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from stat_exp.errors import UserError

RANK_RTOL = 1e-10  # |R_jj| / |R_11| below this counts as rank deficient


class RankError(UserError, ValueError):
    """Calibration statistics cannot support the requested rank."""


class NonFiniteError(UserError, FloatingPointError):
    """Calibration activations with inf or nan: bad input (a dtype too narrow, broken data), one line."""


@dataclass
class Factorization:
    """Column-pivoted factor of A diag(weights): A[:, perm] diag(w[perm]) = Q R."""

    perm: torch.Tensor  # (m,) long, most important unit first
    R: torch.Tensor  # (m, m) float64, upper triangular
    weights: torch.Tensor  # (m,) float64, the column weights used for pivoting

    @property
    def rank(self) -> int:
        d = self.R.diagonal().abs()
        if d.numel() == 0 or d[0] == 0:
            return 0
        return int((d > RANK_RTOL * d[0]).sum())

    def correction(self, k: int) -> torch.Tensor:
        """T (k x m-k) with A[:, removed] ~= A[:, kept] T, in the original (unweighted) scale.

        Units past the numerical rank get zero rows: the first `rank` kept units already span
        everything the calibration data shows.
        """
        m = self.R.shape[0]
        r = min(k, self.rank)
        T = torch.zeros(k, m - k, dtype=self.R.dtype, device=self.R.device)
        if r > 0 and k < m:
            T[:r] = torch.linalg.solve_triangular(self.R[:r, :r], self.R[:r, k:], upper=True)
        w = self.weights[self.perm]
        return w[:k, None] * T / w[None, k:]

    def output_error(self, out_weight: torch.Tensor) -> torch.Tensor:
        """E[k] = ||(A_removed - A_kept T) V_removed^T||_F^2 for keeping the first k units, k=0..m.

        With V the output weights (d_out x m): the exact error the corrected layer adds to its
        output. Since A[:, perm] = Q R, the residual after keeping k units is Q[:, k:] R[k:, k:],
        so E[k] is a suffix sum of column norms of V_perm R^T (weights folded into V).
        """
        V = out_weight.to(self.R)[:, self.perm] / self.weights[self.perm]
        col = torch.cat([(V[:, rows.start:] @ self.R[rows, rows.start:].T).square().sum(0)
                         for rows in row_blocks(self.R.shape[0])]) if self.R.shape[0] else V.new_zeros(0)
        tail = torch.flip(torch.cumsum(torch.flip(col, [0]), 0), [0])
        return torch.cat([tail, tail.new_zeros(1)])


TRIANGLE_BLOCKS = 16  # row blocks of R in V R^T: the zeros left of the diagonal are skipped (~53% of the product)


def row_blocks(m: int) -> list[slice]:
    """TRIANGLE_BLOCKS slices of 0..m, for products that skip an upper-triangular factor's zeros."""
    step = max(1, -(-m // TRIANGLE_BLOCKS))
    return [slice(i, min(i + step, m)) for i in range(0, m, step)]


def weighted_gram(G: torch.Tensor, w: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """diag(w) G diag(w), in the unit order `perm` when given: a new matrix, scaled in place, so a
    7B's 11,008-wide Gram (1 GB) is copied once or twice, not four times."""
    if perm is None:
        return (G * w[:, None]).mul_(w[None, :])
    wp = w[perm]
    return G.index_select(0, perm).mul_(wp[:, None]).index_select(1, perm).mul_(wp[None, :])


PANEL = 64  # pivots per panel of the blocked factorization: one trailing matrix product each
PIVOTING = ("auto", "lapack", "blocked")


def pivoted_cholesky(G: torch.Tensor, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Pivoted Cholesky G[p][:, p] = R^T R (the R of a pivoted QR of any A with A^T A = G).

    `method`: "lapack" (?pstrf, CPU), "blocked" (`_pivoted_cholesky_torch`, on G's device), or
    "auto": LAPACK for CPU tensors when scipy is installed, else blocked. Both stop at the
    numerical rank r, with LAPACK's tolerance (m eps max diag G): rows r.. of R are zero and the
    units past r follow in a deterministic order (`_complete_order`), so the full order a
    selection reads is the same on every device.
    """
    if method not in PIVOTING:
        raise ValueError(f"pivoting={method!r}; allowed: {', '.join(PIVOTING)}")
    lapack = G.device.type == "cpu" and _scipy() is not None
    if method == "lapack" and not lapack:
        raise ValueError("pivoting=lapack needs a CPU tensor and scipy")
    if method == "blocked" or not lapack:
        return _pivoted_cholesky_torch(G)
    from threadpoolctl import threadpool_limits

    # One BLAS thread: measured no faster with two on this machine's two cores, and idle
    # OpenBLAS threads spin and slow the torch work around it.
    with threadpool_limits(1, user_api="blas"):
        R, piv, rank, _ = _scipy().linalg.lapack.dpstrf(G.numpy(), lower=0, tol=-1.0)
    R = torch.from_numpy(R).triu_()
    R[rank:] = 0.0
    return _complete_order(torch.from_numpy(piv.astype(np.int64) - 1), R, G, rank)


def _complete_order(perm: torch.Tensor, R: torch.Tensor, G: torch.Tensor,
                    rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Units past the numerical rank (their pivots would be rounding noise) ordered by their own
    energy G_jj, largest first, ties by index: a deterministic completion, the same from every
    method. R's columns follow the units (its rows past the rank are zero)."""
    if perm.numel() - rank < 2:
        return perm, R
    rest = perm[rank:]
    by_index = torch.argsort(rest, stable=True)
    order = by_index[torch.argsort(-G.diagonal()[rest[by_index].to(G.device)].to(rest.device), stable=True)]
    R[:, rank:] = R[:, rank:][:, order.to(R.device)]
    return torch.cat([perm[:rank], rest[order]]), R


@contextmanager
def full_precision_matmul() -> Iterator[None]:
    """float32 matmuls in full float32 (no TF32) inside: a float32 Gram accumulated with TF32's
    10-bit mantissa would silently change which units are kept."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


_lapack_allowed = True


@contextmanager
def without_lapack() -> Iterator[None]:
    """Inside: the pivoted factorizations take the torch loops on the CPU too, the path every
    accelerator takes, so that path is compared with LAPACK on any machine (tests, gpu_check)."""
    global _lapack_allowed
    before, _lapack_allowed = _lapack_allowed, False
    try:
        yield
    finally:
        _lapack_allowed = before


def _scipy():
    """scipy (LAPACK's pivoted factorizations on the CPU), or None where it is not installed (a GPU
    machine needs only torch: the torch loops below run on any device) or `without_lapack`."""
    if not _lapack_allowed:
        return None
    try:
        import scipy.linalg

        return scipy
    except ImportError:
        return None


def _pivoted_cholesky_torch(G: torch.Tensor, panel: int = PANEL) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked pivoted Cholesky with torch ops, for accelerators (and the CPU without scipy).

    ?pstrf's scheme: pivots are chosen one at a time inside a panel of `panel` rows of R, each row
    formed from the Schur complement as of the panel's start less the panel's earlier rows (a small
    matrix-vector product), and the Schur complement is updated once per panel by one matrix
    product, so the work is matmul-bound instead of one pass over the trailing matrix per pivot
    (the column loop this replaces; `panel=1` is that loop). Rows of R are kept in the units'
    own column order, so nothing is ever swapped, and a pivot's index never leaves the device:
    a pivot step is a dozen small kernels and no host synchronisation (one per panel, for the
    rank). The update covers the whole matrix (2 m^3 flops, not m^3 / 3): on an accelerator the
    product is cheap and the launches are what count.
    """
    m = G.shape[0]
    A = G.clone()
    rows = torch.zeros_like(G)  # row j: the j-th pivot's row of R, columns in the units' order
    perm = torch.zeros(m, dtype=torch.long, device=G.device)
    values = torch.zeros(m, dtype=G.dtype, device=G.device)  # the pivots' Schur values
    open_ = torch.ones(m, dtype=G.dtype, device=G.device)  # 1 for units not yet pivoted
    stop = m * torch.finfo(G.dtype).eps * float(G.diagonal().max()) if m else 0.0
    rank = m
    for k in range(0, m, panel):
        end = min(k + panel, m)
        schur = A.diagonal().clone().masked_fill_(open_ == 0, -float("inf"))
        used = torch.zeros_like(schur)  # what this panel's rows have taken from the diagonal
        for j in range(k, end):
            p = torch.argmax(schur - used).view(1)
            value = (schur - used).index_select(0, p)
            row = A.index_select(0, p)[0]
            if j > k:
                row = row - rows[k:j].index_select(1, p)[:, 0] @ rows[k:j]
            row = row * open_ / value.sqrt()
            rows[j] = row
            used.addcmul_(row, row)
            schur.index_fill_(0, p, -float("inf"))
            open_.index_fill_(0, p, 0.0)
            perm[j], values[j] = p[0], value[0]
        low = (values[k:end] <= stop) | values[k:end].isnan()
        if bool(low.any()):  # the numerical rank is reached inside this panel
            rank = k + int(low.nonzero()[0])
            break
        if end < m:
            P = rows[k:end]
            A.addmm_(P.T, P, alpha=-1.0)
    chosen = perm[:rank]
    rest = torch.ones(m, dtype=torch.bool, device=G.device)
    rest[chosen] = False
    perm = torch.cat([chosen, rest.nonzero()[:, 0]])
    R = torch.zeros_like(G)
    R[:rank] = rows[:rank][:, perm]
    return _complete_order(perm, R, G, rank)


def pivoted_qr(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-pivoted QR, the paper's method; R padded to m x m. LAPACK ?geqp3 on the CPU; on
    other devices `_pivoted_qr_torch`, on that device."""
    m = A.shape[1]
    if A.device.type != "cpu" or _scipy() is None:
        return _pivoted_qr_torch(A.double())
    R, piv = _scipy().linalg.qr(A.detach().double().numpy(), mode="r", pivoting=True,
                             overwrite_a=True, check_finite=False)
    full = np.zeros((m, m))
    full[: R.shape[0]] = R[:m]
    return torch.from_numpy(piv.astype(np.int64)), torch.from_numpy(full)


def _pivoted_qr_torch(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pivoted QR from matmul-bound parts: the pivots of the blocked pivoted Cholesky of A^T A
    (Businger-Golub's largest-remaining-norm rule, which depends only on A^T A), then R from an
    unpivoted Householder QR of the permuted columns (blocked in LAPACK / cuSOLVER), so R keeps
    the accuracy of a QR of A. Diagonal made non-negative (the fold and the error curve do not
    depend on row signs)."""
    n, m = A.shape
    perm, _ = _pivoted_cholesky_torch(A.T @ A)
    k = min(n, m)
    R = torch.zeros(m, m, dtype=A.dtype, device=A.device)
    if k:
        R[:k] = torch.linalg.qr(A[:, perm], mode="r").R[:k]
        sign = torch.where(R.diagonal()[:k] < 0, -1.0, 1.0).to(A.dtype)
        R[:k] *= sign[:, None]
    return perm, R


class Accumulator(ABC):
    """Streams calibration activations (tokens x units) into what a backend needs."""

    def __init__(self, dim: int, device: torch.device):
        self.dim = dim
        self.device = device
        self.n_tokens = 0

    def update(self, x: torch.Tensor) -> None:
        """Add a (tokens x dim) block of activations."""
        self.n_tokens += x.shape[0]
        self._update(x)

    def factorize(self, weights: torch.Tensor | None = None) -> Factorization:
        """Column-pivoted factor of A diag(weights)."""
        self._check_finite()
        return self._factorize(self._weights(weights))

    def gram(self) -> torch.Tensor:
        """A^T A (exact or sketched), float64, on the accumulator's device."""
        self._check_finite()
        return self._gram()

    def _check_finite(self) -> None:
        if not torch.isfinite(self._finite_witness()).all():
            raise NonFiniteError("calibration activations are not finite (inf or nan): "
                                     "check the model dtype (model.dtype=float32) and the calibration data")

    @abstractmethod
    def statistic(self) -> torch.Tensor:
        """What the accumulator holds (Gram, activations or sketch); any inf/nan in A shows in it."""

    def _finite_witness(self) -> torch.Tensor:
        """The part of `statistic` that any inf/nan in A reaches (all of it, unless a backend knows less suffices)."""
        return self.statistic()

    @abstractmethod
    def _update(self, x: torch.Tensor) -> None: ...

    @abstractmethod
    def _gram(self) -> torch.Tensor: ...

    @abstractmethod
    def _factorize(self, w: torch.Tensor) -> Factorization: ...

    def _weights(self, weights: torch.Tensor | None) -> torch.Tensor:
        if weights is None:
            return torch.ones(self.dim, dtype=torch.float64, device=self.device)
        w = weights.detach().double().to(self.device)
        return w.clamp_min(float(w.max()) * 1e-12 if w.max() > 0 else 1.0)


FLOAT64_BYTES = 8


class Backend(ABC):
    """A factorization backend: makes accumulators for a given width."""

    name: str = ""
    holds_activations: bool = False  # True when memory grows with the calibration tokens

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    @abstractmethod
    def accumulator(self, dim: int) -> Accumulator: ...

    def statistics_bytes(self, dim: int, tokens: int) -> int:
        """Bytes one accumulator of width `dim` holds after `tokens` calibration tokens (what the
        planner sizes a block's statistics by): a float64 dim x dim matrix by default; a backend
        whose accumulator holds more (or grows with the tokens) says so here."""
        return dim * dim * FLOAT64_BYTES
