"""Scored blocks waiting for a global allocation.

The allocation needs every block's cost curves (small) before any block is pruned, but applying a
plan needs the block's heavy state (its factorizations: one d_ff x d_ff matrix per block, ~1 GB
for a 7B model's FFN). `Pending` holds everything in memory; `SpilledPending` writes each block's
heavy state to a file as soon as the block is scored and reads it back when the block is pruned,
so memory does not grow with depth (disk does).
"""
from __future__ import annotations

import shutil
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

import torch

from stat_exp.calibrate import LayerStats
from stat_exp.prune.scores import LayerScores


class Pending(AbstractContextManager):
    """Scores and statistics of every block, heavy state held in memory until the block is taken."""

    def __init__(self) -> None:
        self._items: list[tuple[LayerScores, LayerStats] | None] = []

    def put(self, index: int, scores: LayerScores, stats: LayerStats, keep_heavy: bool = True) -> None:
        """Add block `index` (blocks arrive in order); without `keep_heavy` its heavy state is dropped."""
        if index != len(self._items):
            raise ValueError(f"blocks must arrive in order: expected {len(self._items)}, got {index}")
        if keep_heavy:
            self._stash(index, scores)
        else:
            scores.heavy = {}
        self._items.append((scores, stats))

    def _stash(self, index: int, scores: LayerScores) -> None:
        """Where a subclass moves the heavy state out of memory."""

    def scores(self) -> list[LayerScores]:
        """Every block's scores (what the allocation reads)."""
        return [item[0] for item in self._items]

    def peek(self, index: int) -> tuple[LayerScores, LayerStats]:
        """Block `index` with its heavy state, still kept here (for trying plans before the one applied)."""
        item = self._items[index]
        if item is None:
            raise ValueError(f"block {index} was already taken")
        return item

    def take(self, index: int) -> tuple[LayerScores, LayerStats]:
        """Block `index` with its heavy state, forgotten here (so applied blocks free their memory)."""
        item, self._items[index] = self._items[index], None
        if item is None:
            raise ValueError(f"block {index} was already taken")
        return item

    def __exit__(self, *exc) -> None:
        self._items.clear()


class SpilledPending(Pending):
    """Heavy state in one file per block under `folder` (removed on exit)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        return self.folder / f"block_{index:05d}.pt"

    def _stash(self, index: int, scores: LayerScores) -> None:
        tmp = self._path(index).with_suffix(".partial")
        torch.save(scores.heavy, tmp)
        tmp.replace(self._path(index))
        scores.heavy = {}

    def peek(self, index: int) -> tuple[LayerScores, LayerStats]:
        scores, stats = super().peek(index)
        path = self._path(index)
        return (replace(scores, heavy=torch.load(path, weights_only=False)) if path.exists() else scores), stats

    def take(self, index: int) -> tuple[LayerScores, LayerStats]:
        scores, stats = super().take(index)
        path = self._path(index)
        if path.exists():
            scores.heavy = torch.load(path, weights_only=False)
            path.unlink()
        return scores, stats

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        shutil.rmtree(self.folder, ignore_errors=True)
