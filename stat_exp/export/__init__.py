"""Pruned models as ordinary checkpoints: save a folder the ecosystem loads, and load it back."""
