"""Constrained types for config signatures: `batch_size: PositiveInt`, `flops: Fraction`.

Plain `typing.Annotated` with annotated-types constraints, which pydantic enforces when a config is
validated; the classes that use them stay ordinary Python.
"""
from __future__ import annotations

from typing import Annotated

from annotated_types import Ge, Gt, Le, Lt

PositiveInt = Annotated[int, Gt(0)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
Fraction = Annotated[float, Gt(0), Le(1)]  # (0, 1]
NonNegativeFloat = Annotated[float, Ge(0)]
OpenFraction = Annotated[float, Gt(0), Lt(1)]  # (0, 1)
MAX_SEED = 2**32 - 1  # numpy's and scikit-learn's seeds are 32-bit; torch's accept these too
Seed = Annotated[int, Ge(0), Le(MAX_SEED)]
MAX_TOKENS = 2**24  # a sequence length beyond any model's positions (16,777,216 tokens)
SeqLen = Annotated[int, Gt(0), Le(MAX_TOKENS)]

