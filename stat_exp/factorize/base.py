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
        col = (V @ self.R.T).square().sum(0)
        tail = torch.flip(torch.cumsum(torch.flip(col, [0]), 0), [0])
        return torch.cat([tail, tail.new_zeros(1)])


def pivoted_cholesky(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pivoted Cholesky G[p][:, p] = R^T R (the R of a pivoted QR of any A with A^T A = G).

    LAPACK ?pstrf on the CPU; a greedy loop in torch on other devices. Stops at the numerical
    rank; the rows past it are zero.
    """
    if G.device.type == "cpu" and _scipy() is not None:
        from threadpoolctl import threadpool_limits

        # One BLAS thread: ?pstrf is mostly level-2 and gains nothing from more (measured), while
        # idle OpenBLAS threads spin and slow the torch work around it.
        with threadpool_limits(1, user_api="blas"):
            R, piv, rank, _ = _scipy().linalg.lapack.dpstrf(G.numpy(), lower=0, tol=-1.0)
        R = torch.from_numpy(R).triu_()
        R[rank:] = 0.0
        return torch.from_numpy(piv.astype(np.int64) - 1), R
    return _pivoted_cholesky_torch(G)


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


def _pivoted_cholesky_torch(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-looking greedy pivoted Cholesky with torch ops, for accelerators."""
    m = G.shape[0]
    A = G.clone()
    perm = torch.arange(m, device=G.device)
    R = torch.zeros_like(G)
    d = A.diagonal().clone()
    tol = m * torch.finfo(G.dtype).eps * float(d.max()) if m else 0.0  # LAPACK ?pstrf's default stop
    for j in range(m):
        p = j + int(torch.argmax(d[j:]))
        if float(d[p]) <= tol:
            break
        if p != j:
            for t in (perm, d):
                t[[j, p]] = t[[p, j]]
            A[[j, p]] = A[[p, j]]
            A[:, [j, p]] = A[:, [p, j]]
            R[:j, [j, p]] = R[:j, [p, j]]
        rjj = torch.sqrt(d[j])
        R[j, j] = rjj
        R[j, j + 1:] = (A[j, j + 1:] - R[:j, j] @ R[:j, j + 1:]) / rjj
        d[j + 1:] -= R[j, j + 1:].square()
    return perm, R


def pivoted_qr(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-pivoted Householder QR, the paper's method; R padded to m x m. LAPACK ?geqp3 on the
    CPU; on other devices a Householder loop in torch (Businger-Golub pivoting), on that device."""
    m = A.shape[1]
    if A.device.type != "cpu" or _scipy() is None:
        return _pivoted_qr_torch(A.double())
    R, piv = _scipy().linalg.qr(A.detach().double().numpy(), mode="r", pivoting=True,
                             overwrite_a=True, check_finite=False)
    full = np.zeros((m, m))
    full[: R.shape[0]] = R[:m]
    return torch.from_numpy(piv.astype(np.int64)), torch.from_numpy(full)


def _pivoted_qr_torch(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Householder QR with column pivoting by the largest remaining column norm, with torch ops."""
    A = A.clone()
    n, m = A.shape
    perm = torch.arange(m, device=A.device)
    norms = A.square().sum(0)
    tol = RANK_RTOL**2 * float(norms.max()) if m and n else 0.0
    for j in range(min(n, m)):
        p = j + int(torch.argmax(norms[j:]))
        if float(norms[p]) <= tol:
            A[j:, j:] = 0.0
            break
        if p != j:
            for t in (perm, norms):
                t[[j, p]] = t[[p, j]]
            A[:, [j, p]] = A[:, [p, j]]
        x = A[j:, j]
        alpha = -torch.copysign(torch.linalg.vector_norm(x), x[0])
        v = x.clone()
        v[0] -= alpha
        v = v / torch.linalg.vector_norm(v).clamp_min(1e-300)
        A[j:, j:] -= 2.0 * torch.outer(v, v @ A[j:, j:])
        norms[j + 1:] = A[j + 1:, j + 1:].square().sum(0)  # recomputed: downdating loses digits
    R = torch.zeros(m, m, dtype=A.dtype, device=A.device)
    k = min(n, m)
    R[:k] = torch.triu(A[:k])
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
        if not torch.isfinite(self.statistic()).all():
            raise NonFiniteError("calibration activations are not finite (inf or nan): "
                                     "check the model dtype (model.dtype=float32) and the calibration data")

    @abstractmethod
    def statistic(self) -> torch.Tensor:
        """What the accumulator holds (Gram, activations or sketch); any inf/nan in A shows in it."""

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
