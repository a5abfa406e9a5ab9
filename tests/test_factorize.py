"""Backends: the same interpolative decomposition from Gram, activations or a sketch."""
from __future__ import annotations

import pytest
import torch

from stat_exp.factorize import GramBackend, QRBackend, SketchBackend, pivoted_cholesky
from stat_exp.factorize.base import _pivoted_cholesky_torch, _pivoted_qr_torch, pivoted_qr, weighted_gram, without_lapack
from stat_exp.factorize.gram import TILE_MIN
from stat_exp.prune.held_out import HeldOutAccumulator


def activations(n=400, m=30, decay=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -decay, m, dtype=torch.float64)
    return torch.randn(n, m, generator=g, dtype=torch.float64) * scales[torch.randperm(m, generator=g)]


def fill(backend, A, blocks=4):
    acc = backend.accumulator(A.shape[1])
    for part in A.chunk(blocks):
        acc.update(part)
    return acc


def test_gram_and_qr_pick_the_same_units_and_corrections():
    A = activations()
    w = torch.rand(A.shape[1], dtype=torch.float64) + 0.5
    fg = fill(GramBackend(block_dtype="float64"), A).factorize(w)
    fq = fill(QRBackend(), A).factorize(w)
    assert torch.equal(fg.perm, fq.perm)
    torch.testing.assert_close(fg.R.abs(), fq.R.abs(), rtol=1e-8, atol=1e-8)
    for k in (1, 7, 20):
        torch.testing.assert_close(fg.correction(k), fq.correction(k), rtol=1e-7, atol=1e-9)


def test_correction_is_the_least_squares_fit_and_error_curve_is_exact():
    A = activations()
    V = torch.randn(5, A.shape[1], dtype=torch.float64)
    f = fill(GramBackend(block_dtype="float64"), A).factorize(V.norm(dim=0))
    errors = f.output_error(V)
    assert errors[-1] == 0 and torch.all(errors[:-1] >= errors[1:] - 1e-9)
    for k in (3, 12):
        kept, removed = f.perm[:k], f.perm[k:]
        T = f.correction(k)
        lstsq = torch.linalg.lstsq(A[:, kept], A[:, removed]).solution
        torch.testing.assert_close(T, lstsq, rtol=1e-6, atol=1e-8)
        direct = ((A[:, removed] - A[:, kept] @ T) @ V[:, removed].T).square().sum()
        assert float(errors[k]) == pytest.approx(float(direct), rel=1e-8)
    assert float(errors[0]) == pytest.approx(float((A @ V.T).square().sum()), rel=1e-10)


def test_rank_deficient_statistics_reconstruct_exactly():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(200, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 12, generator=g, dtype=torch.float64)
    f = fill(GramBackend(block_dtype="float64"), A).factorize()
    assert f.rank == 4
    for k in (4, 6):  # past the rank the extra kept units get zero coefficients
        T = f.correction(k)
        torch.testing.assert_close(A[:, f.perm[:k]] @ T, A[:, f.perm[k:]], rtol=1e-7, atol=1e-7)


def low_rank(n=200, rank=6, m=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, m, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("panel", [1, 7, 64])
@pytest.mark.parametrize("A", [activations(m=150), low_rank()], ids=["full_rank", "rank_6"])
def test_blocked_torch_pivoted_cholesky_matches_lapack(A, panel):
    """The accelerators' path, run here on the CPU: several panels (7), one panel (64) and the
    column loop (1) give LAPACK's pivots, R and rank."""
    G = A.T @ A
    p1, R1 = pivoted_cholesky(G, method="lapack")
    p2, R2 = _pivoted_cholesky_torch(G, panel)
    assert torch.equal(p1, p2)
    torch.testing.assert_close(R1, R2, rtol=1e-9, atol=1e-9)
    assert torch.equal(pivoted_cholesky(G, method="blocked")[0], p1)


def test_order_past_the_rank_is_completed_by_energy():
    """Units the calibration data cannot tell apart (past the numerical rank) follow in a fixed
    order, largest energy first, ties by index, on every path."""
    A = low_rank(rank=4, m=12)
    A[:, 5] = 0.0  # a dead unit: last
    G = A.T @ A
    for method in ("lapack", "blocked"):
        perm, R = pivoted_cholesky(G, method=method)
        rest = perm[4:]
        energy = G.diagonal()[rest]
        assert torch.all(energy[:-1] >= energy[1:]) and int(rest[-1]) == 5
        assert torch.all(R[4:] == 0)


@pytest.mark.parametrize("shape", [(400, 30), (300, 120)])
def test_torch_pivoted_qr_matches_lapack(shape):
    n, m = shape
    A = activations(n=n, m=m)
    p1, R1 = pivoted_qr(A.clone())
    p2, R2 = _pivoted_qr_torch(A)
    assert torch.equal(p1, p2)
    torch.testing.assert_close(R1.abs(), R2.abs(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
def test_sketch_approximates_the_leading_units(kind):
    """With the shipped settings (the class defaults conf/factorization/sketch.yaml uses), not a
    generous sketch that would hide a bad default."""
    A = activations(n=2000, m=20, decay=4.0)
    exact = fill(GramBackend(block_dtype="float64"), A).factorize()
    sketched = fill(SketchBackend(kind=kind), A).factorize()
    assert sketched.perm[0] == exact.perm[0]
    assert len(set(sketched.perm[:5].tolist()) & set(exact.perm[:5].tolist())) >= 4


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e20])  # 1e20^2 overflows float32
def test_non_finite_activations_are_rejected(value):
    """The Gram backend checks only its diagonal: any bad activation, in any tile, must reach it."""
    m = 2 * TILE_MIN + 3  # several tiles, so off-diagonal tiles are products of their own
    x = torch.ones(4, m)
    x[2, m - 1] = value
    for acc in (GramBackend().accumulator(m), HeldOutAccumulator(GramBackend().accumulator(m),
                                                                 GramBackend().accumulator(m), 0.5)):
        acc.update(torch.ones(4, m))
        acc.update(x)
        with pytest.raises(FloatingPointError, match="not finite"):
            acc.factorize()
        with pytest.raises(FloatingPointError, match="not finite"):
            acc.gram()


def test_the_gram_mirrored_once_follows_later_updates():
    """The mirrored Gram is kept between calls, and an update after one starts from the upper tiles again."""
    m = 2 * TILE_MIN + 3
    A = torch.randn(600, m, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    acc = GramBackend(block_dtype="float64").accumulator(m)
    acc.update(A[:300])
    first = acc.gram()
    assert acc.gram() is first
    acc.update(A[300:])
    torch.testing.assert_close(acc.gram(), A.T @ A)
    assert torch.equal(acc.gram(), acc.gram().T)


def test_weighted_gram_scales_then_orders():
    G = torch.randn(7, 7, dtype=torch.float64)
    w, perm = torch.rand(7, dtype=torch.float64) + 0.5, torch.randperm(7)
    expected = (G * w[:, None] * w[None, :])
    assert torch.equal(weighted_gram(G, w), expected)
    assert torch.equal(weighted_gram(G, w, perm), expected[perm][:, perm])


def test_float32_blocks_stay_close_to_float64():
    A = activations().float()
    g64 = fill(GramBackend(block_dtype="float64"), A).gram()
    g32 = fill(GramBackend(block_dtype="float32"), A).gram()
    torch.testing.assert_close(g32, g64, rtol=1e-5, atol=1e-6)
    assert torch.equal(g32, g32.T)


@pytest.mark.parametrize("m", [30, 2 * TILE_MIN + 3])
def test_gram_is_exact_and_symmetric_when_built_from_tiles(m):
    """Wide Grams are accumulated from upper tiles; reading the Gram between updates must not
    disturb the running sum."""
    A = activations(n=64, m=m)
    acc = GramBackend(block_dtype="float64").accumulator(m)
    acc.update(A[:40])
    torch.testing.assert_close(acc.gram(), A[:40].T @ A[:40], rtol=1e-12, atol=1e-12)
    acc.update(A[40:])
    G = acc.gram()
    torch.testing.assert_close(G, A.T @ A, rtol=1e-12, atol=1e-12)
    assert torch.equal(G, G.T)


@pytest.mark.parametrize("backend", [lambda: GramBackend(block_dtype="float64"), QRBackend, SketchBackend])
@pytest.mark.parametrize("rank", [None, 6])
def test_the_torch_loops_every_accelerator_takes_match_lapack(backend, rank):
    """The same factorization with LAPACK and with the torch loops (`without_lapack`: the path off
    the CPU), full rank and rank deficient: same pivots, same R up to the sign of each row."""
    g = torch.Generator().manual_seed(2)
    A = activations(n=300, m=24) if rank is None else (
        torch.randn(300, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, 24, generator=g, dtype=torch.float64))
    w = torch.rand(A.shape[1], dtype=torch.float64, generator=g) + 0.5
    lapack = fill(backend(), A).factorize(w)
    with without_lapack():
        loops = fill(backend(), A).factorize(w)
    r = lapack.rank
    assert loops.rank == r == (rank or A.shape[1])
    assert torch.equal(lapack.perm[:r], loops.perm[:r])  # past the rank the order is arbitrary

    def by_unit(f):  # R's first r rows with columns in unit order, rows signed by their diagonal
        R = torch.zeros_like(f.R[:r])
        R[:, f.perm] = f.R[:r]
        return R * f.R.diagonal()[:r].sign()[:, None]

    torch.testing.assert_close(by_unit(lapack), by_unit(loops), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
def test_the_sketch_keeps_every_batch(kind):
    """E[(SA)^T (SA)] = A^T A: a sketch of four batches carries the energy of all four, not of the last."""
    A = activations(n=800, m=10)
    sketch = fill(SketchBackend(kind=kind, rows_per_unit=50), A, blocks=4).gram()
    assert float(sketch.trace() / (A.T @ A).trace()) == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("kind", ["gaussian", "countsketch"])
def test_the_sketch_pivots_on_the_weighted_columns(kind):
    """Column weights that reverse the order of the column norms reverse the pivots, as the exact
    factorization's do."""
    g = torch.Generator().manual_seed(3)
    scales = torch.logspace(0, -6, 20, dtype=torch.float64)  # column j has norm ~ scales[j]
    A = torch.randn(2000, 20, generator=g, dtype=torch.float64) * scales
    w = scales.pow(-2)  # weighted norms ~ 1 / scales: the last column is now the largest
    exact = fill(GramBackend(block_dtype="float64"), A).factorize(w)
    sketched = fill(SketchBackend(kind=kind, rows_per_unit=4), A).factorize(w)
    assert int(exact.perm[0]) == 19 and torch.equal(sketched.perm[:3], exact.perm[:3])
