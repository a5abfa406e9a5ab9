"""Calibration and evaluation data: embedded corpora and local files first, hub names when online."""

from stat_exp.data.calibration import calibration_batches, sample_windows
from stat_exp.data.text import TEXT_CORPORA, DataError, encode, load_text

__all__ = ["TEXT_CORPORA", "DataError", "calibration_batches", "encode", "load_text", "sample_windows"]
