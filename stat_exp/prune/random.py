"""`random`: random heads and neurons, the floor any informed pruner has to beat.

Every layer draws its own random ranking from (seed, layer index), so a run is reproducible and a
layer's draw does not depend on the others. The counts are either the shared allocation's
(`allocation: uniform` in its config: random scores carry no information to allocate by, so a
global allocation would only be a second random draw), or copied from a structure file
(results.json of a run or a saved model's structure.json): the same heads, KV heads and neurons
per layer as that run, but random units.
With a structure file the counts are the file's, whatever budget.flops says.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stat_exp.calibrate import LayerStats
from stat_exp.errors import ConfigError
from stat_exp.execution.requirements import Requirements
from stat_exp.models.base import ModelAdapter
from stat_exp.models.flops import FlopsModel, LayerShape
from stat_exp.prune.base import AllocationChoice, Pruner
from stat_exp.prune.budget import BudgetSpec, LayerPlan
from stat_exp.prune.scores import LayerScores
from stat_exp.types import GqaMode, Seed

STRUCTURE_KEYS = ("heads", "kv_heads", "neurons")


def read_structure(path: str | Path) -> dict[str, list[int]]:
    """Per-layer counts from a results.json ("structure" entry) or a structure.json (top level)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"pruner.structure_file={str(path)!r} does not exist")
    data = json.loads(path.read_text(encoding="utf-8"))
    structure = data.get("structure", data) or {}
    if any(not isinstance(structure.get(k), list) for k in STRUCTURE_KEYS):
        raise ConfigError(f"pruner.structure_file={str(path)!r} has no per-layer {', '.join(STRUCTURE_KEYS)} "
                          f"(expected a results.json or a saved model's structure.json)")
    return {k: [int(v) for v in structure[k]] for k in STRUCTURE_KEYS}


class RandomPruner(Pruner):
    name = "random"
    requirements = Requirements(calibration=False)

    def __init__(self, gqa: GqaMode = "per_group", seed: Seed = 0, allocation: AllocationChoice = "uniform",
                 structure_file: str | None = None):
        """`allocation="uniform"`: random scores cannot inform a global allocation. `structure_file`: a
        results.json or structure.json whose per-layer counts are copied (random units; budget ignored)."""
        super().__init__(gqa, allocation)
        self.seed = seed
        self.structure = read_structure(structure_file) if structure_file else None

    @property
    def variant(self) -> str:
        return "copied structure" if self.structure else ""

    def prepare(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                examples: list[dict[str, torch.Tensor]] | None = None) -> None:
        if self.structure and len(self.structure["heads"]) != len(adapter.layers()):
            raise ConfigError(f"pruner.structure_file has {len(self.structure['heads'])} layers, "
                              f"the model has {len(adapter.layers())}")

    def score(self, adapter: ModelAdapter, index: int, layer: nn.Module, stats: LayerStats | None) -> LayerScores:
        attn, width = adapter.attention(layer), adapter.ffn(layer).width
        rng = np.random.default_rng([self.seed, index])
        heads = torch.from_numpy(rng.random(attn.num_heads)).repeat_interleave(attn.head_dim)
        return self.ranked(adapter, layer, heads, torch.from_numpy(rng.random(width)))

    def fixed_plans(self, layers: list[int], scores: list[LayerScores], shapes: list[LayerShape],
                    flops: FlopsModel, budget: BudgetSpec) -> list[LayerPlan] | None:
        if self.structure:
            return [self._copied(i, sc, sh) for i, sc, sh in zip(layers, scores, shapes)]
        return None

    def _copied(self, index: int, scores: LayerScores, shape: LayerShape) -> LayerPlan:
        heads, kv, neurons = (self.structure[k][index] for k in STRUCTURE_KEYS)
        layouts = [(lv.num_heads, lv.num_kv_heads) for lv in scores.attn_levels]
        if (heads, kv) not in layouts:
            raise ConfigError(f"pruner.structure_file: layer {index} keeps {heads} heads / {kv} KV heads, not a layout "
                              f"of pruner.gqa={self.gqa} (valid: {layouts}); set pruner.gqa as in that run")
        if not 1 <= neurons <= shape.ffn_width:
            raise ConfigError(f"pruner.structure_file: layer {index} keeps {neurons} neurons of {shape.ffn_width}")
        return LayerPlan(layouts.index((heads, kv)), neurons)
