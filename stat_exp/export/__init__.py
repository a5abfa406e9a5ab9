"""Pruned models as ordinary checkpoints: save a folder the ecosystem loads, and load it back
(the loading itself is `stat_exp.models.checkpoint`, which a run uses too)."""
from stat_exp.export.save import save_pruned
from stat_exp.models.checkpoint import load_pruned

__all__ = ["load_pruned", "save_pruned"]
