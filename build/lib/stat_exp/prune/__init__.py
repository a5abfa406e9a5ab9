"""Pruners, the FLOPs budget and the surgery that slices a model to a plan."""
