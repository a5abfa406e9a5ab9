"""`block_drop`: remove whole blocks, those that change the hidden state least (ShortGPT, Men et al. 2024).

A block's influence is 1 - cos(input, output) of its hidden states, averaged over the real
calibration tokens of the dense model; the least influential blocks go, all at once, until the
kept blocks' FLOPs fit the budget. The model keeps the stock architecture with fewer layers
(config.num_hidden_layers), so it saves as an ordinary checkpoint; config.removed_blocks and
results.json's structure["removed_blocks"] say which blocks (indices in the input model) went.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stat_exp.calibrate import real_tokens
from stat_exp.models.base import ModelAdapter
from stat_exp.models.flops import FlopsModel, shapes_of
from stat_exp.prune.budget import BudgetError, BudgetSpec
from stat_exp.prune.whole_model import WholeModelPruner, block_inputs, run_block

REMOVED_KEY = "removed_blocks"  # config attribute (and structure key) listing the removed blocks


class BlockDropPruner(WholeModelPruner):
    name = "block_drop"

    def transform(self, model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]],
                  flops: FlopsModel, budget: BudgetSpec) -> None:
        influence = block_influence(model, adapter, batches)
        removed = blocks_to_remove(influence, [flops.dense(s) for s in shapes_of(adapter)], budget.flops)
        remove_blocks(model, adapter, removed)


@torch.no_grad()
def block_influence(model: nn.Module, adapter: ModelAdapter, batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """Per block, 1 - the mean cosine similarity of its input and output hidden states (real tokens)."""
    boundary = block_inputs(model, adapter, batches)
    hidden, influence = boundary.hidden, []
    for i, layer in enumerate(adapter.layers()):
        out = run_block(layer, boundary, i, hidden)
        cos = [torch.nn.functional.cosine_similarity(real_tokens(a, m).double(), real_tokens(b, m).double(), dim=-1)
               for a, b, m in zip(hidden, out, boundary.masks)]
        influence.append(1.0 - float(torch.cat(cos).mean()))
        hidden = out
    return np.array(influence)


def blocks_to_remove(influence: np.ndarray, block_flops: list[float], target: float) -> list[int]:
    """The least influential blocks, fewest first, until the rest keep at most `target` of the FLOPs."""
    total, kept, removed = sum(block_flops), sum(block_flops), []
    for i in np.argsort(influence, kind="stable"):
        if kept <= target * total * (1 + 1e-9):
            break
        removed.append(int(i))
        kept -= block_flops[i]
    if len(removed) == len(block_flops):
        raise BudgetError(f"budget.flops={target} would remove every block (pruner=block_drop)")
    return sorted(removed)


def remove_blocks(model: nn.Module, adapter: ModelAdapter, removed: list[int]) -> None:
    """Delete blocks `removed` from the model's block list; renumber the rest for the KV cache and
    update the config (layer count, per-layer types, the removed indices)."""
    layers = adapter.layers()
    container = next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and m[0] is layers[0])
    for i in sorted(removed, reverse=True):
        del container[i]
    for new, layer in enumerate(container):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = model.config
    kept = [i for i in range(len(layers)) if i not in set(removed)]
    update = {"num_hidden_layers": len(kept), REMOVED_KEY: sorted(set(getattr(config, REMOVED_KEY, None) or []) | set(removed))}
    if isinstance(getattr(config, "layer_types", None), list):
        update["layer_types"] = [config.layer_types[i] for i in kept]
    config.update(update)
