"""Scored blocks waiting for a global allocation (`execution.factors`).

The allocation needs every block's cost curves (small) before any block is pruned, but applying a
plan needs the block's heavy state (its factorizations: one d_ff x d_ff matrix per block, ~1 GB
for a 7B model's FFN). Each factors mode is one class saying where that state waits, what it
holds (`footprint`) and whether the blocks are scored again in a second pass:
`hold` keeps it in memory, `spill` writes each block's to a file as soon as the block is scored and
reads it back when the block is pruned (memory flat in depth, disk grows), `recompute` drops it and
scores every block again after the allocation (nothing grows; one more pass over the calibration set).
"""
from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from stat_exp.errors import ConfigError
from stat_exp.execution.sizes import Footprint, Sizes


class Scored(Protocol):
    """What waits for the allocation: a block's scores, whose `heavy` state (the pruner's own
    dataclass, or None) may move out of memory."""

    heavy: Any


class Pending(AbstractContextManager):
    """Scores and statistics of every block, heavy state held in memory until the block is taken."""

    def __init__(self) -> None:
        self._items: list[tuple[Scored, Any] | None] = []

    def put(self, index: int, scores: Scored, stats: Any, keep_heavy: bool = True) -> None:
        """Add block `index` (blocks arrive in order); without `keep_heavy` its heavy state is dropped."""
        if index != len(self._items):
            raise ValueError(f"blocks must arrive in order: expected {len(self._items)}, got {index}")
        if keep_heavy:
            self._stash(index, scores)
        else:
            scores.heavy = None
        self._items.append((scores, stats))

    def _stash(self, index: int, scores: Scored) -> None:
        """Where a subclass moves the heavy state out of memory."""

    def scores(self) -> list[Any]:
        """Every block's scores (what the allocation reads)."""
        return [item[0] for item in self._items if item is not None]

    def peek(self, index: int) -> tuple[Any, Any]:
        """Block `index` with its heavy state, still kept here (for trying plans before the one applied)."""
        item = self._items[index]
        if item is None:
            raise ValueError(f"block {index} was already taken")
        return item

    def take(self, index: int) -> tuple[Any, Any]:
        """Block `index` with its heavy state, forgotten here (so applied blocks free their memory)."""
        item, self._items[index] = self._items[index], None
        if item is None:
            raise ValueError(f"block {index} was already taken")
        return item

    def __exit__(self, *exc: object) -> None:
        self._items.clear()


class SpilledPending(Pending):
    """Heavy state in one file per block under `folder` (removed on exit)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        return self.folder / f"block_{index:05d}.pt"

    def _stash(self, index: int, scores: Scored) -> None:
        tmp = self._path(index).with_suffix(".partial")
        torch.save(scores.heavy, tmp)
        tmp.replace(self._path(index))
        scores.heavy = None

    def peek(self, index: int) -> tuple[Any, Any]:
        scores, stats = super().peek(index)
        path = self._path(index)
        return (replace(scores, heavy=torch.load(path, weights_only=False)) if path.exists() else scores), stats

    def take(self, index: int) -> tuple[Any, Any]:
        scores, stats = super().take(index)
        path = self._path(index)
        if path.exists():
            scores.heavy = torch.load(path, weights_only=False)
            path.unlink()
        return scores, stats

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        shutil.rmtree(self.folder, ignore_errors=True)


class FactorsMode(ABC):
    """Where scored blocks' heavy state waits for a global allocation (one subclass per mode)."""

    mode: ClassVar[str]
    second_pass: ClassVar[bool] = False  # blocks are scored again after the allocation (heavy state dropped)

    def __init__(self, folder: Path | None = None) -> None:
        """`folder`: where a mode that writes files puts them."""
        self.folder = folder

    @staticmethod
    @abstractmethod
    def footprint(sizes: Sizes) -> Footprint:
        """What every block's waiting heavy state costs: `device` is the memory the factorizations
        live in (the host's on a CPU), `disk` the files."""

    def pending(self) -> Pending:
        """The container the scored blocks wait in."""
        return Pending()


class HoldFactors(FactorsMode):
    """`factors=hold`: every scored block's heavy state in memory until the allocation is decided."""

    mode: ClassVar[str] = "hold"

    @staticmethod
    def footprint(sizes: Sizes) -> Footprint:
        return Footprint(device=sizes.all_heavy)


class SpillFactors(FactorsMode):
    """`factors=spill`: each block's heavy state in a file of its own until its block is pruned."""

    mode: ClassVar[str] = "spill"

    def __init__(self, folder: Path | None = None) -> None:
        if folder is None:
            raise ConfigError("execution.factors=spill needs a folder for the spilled factors")
        super().__init__(folder)

    @staticmethod
    def footprint(sizes: Sizes) -> Footprint:
        return Footprint(disk=sizes.all_heavy)

    def pending(self) -> Pending:
        assert self.folder is not None
        return SpilledPending(self.folder)


class RecomputeFactors(FactorsMode):
    """`factors=recompute`: the heavy state is dropped and the blocks scored again after the allocation."""

    mode: ClassVar[str] = "recompute"
    second_pass: ClassVar[bool] = True

    @staticmethod
    def footprint(sizes: Sizes) -> Footprint:
        return Footprint()


FACTORS: dict[str, type[FactorsMode]] = {f.mode: f for f in (HoldFactors, SpillFactors, RecomputeFactors)}


def factors_class(mode: str) -> type[FactorsMode]:
    """The class of a factors mode."""
    if mode not in FACTORS:
        raise ConfigError(f"execution.factors={mode!r}; allowed: {', '.join(FACTORS)}")
    return FACTORS[mode]
