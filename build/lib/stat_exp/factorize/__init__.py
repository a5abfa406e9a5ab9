"""Interpolative-decomposition backends: `gram` (default), `qr` (the paper's), `sketch` (randomized)."""
from stat_exp.factorize.base import Accumulator, Backend, Factorization, RankError, pivoted_cholesky, pivoted_qr
from stat_exp.factorize.gram import GramBackend
from stat_exp.factorize.qr import QRBackend
from stat_exp.factorize.sketch import SketchBackend

__all__ = ["Accumulator", "Backend", "Factorization", "GramBackend", "QRBackend", "RankError",
           "SketchBackend", "pivoted_cholesky", "pivoted_qr"]
