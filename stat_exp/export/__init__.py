"""Pruned models as ordinary checkpoints: save a folder the ecosystem loads, and load it back."""
from stat_exp.export.load import load_pruned
from stat_exp.export.save import save_pruned

__all__ = ["load_pruned", "save_pruned"]
