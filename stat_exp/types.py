"""Types shared across subpackages, in a leaf module (it imports nothing of stat_exp).

Constrained types for config signatures (`batch_size: PositiveInt`, `flops: Fraction`): plain
`typing.Annotated` with annotated-types constraints, which pydantic enforces when a config is
validated; the classes that use them stay ordinary Python. And the literal choices several
subpackages name (a config value's allowed strings are listed once, here).
"""
from __future__ import annotations

from typing import Annotated, Literal, get_args

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


Propagate = Literal["dense", "pruned"]  # what each block is fed while pruning (calib.propagate)
PROPAGATE_MODES = get_args(Propagate)
Allocation = Literal["global", "uniform"]  # budget.allocation
ALLOCATIONS = get_args(Allocation)
GqaMode = Literal["per_group", "whole_groups"]  # pruner.gqa
GQA_MODES = get_args(GqaMode)
SquadVersion = Literal["1.1", "2.0"]
SQUAD_VERSIONS = get_args(SquadVersion)
LABELS = "labels"  # batch key for task labels: used by loss-based pruners, never fed to the stream
