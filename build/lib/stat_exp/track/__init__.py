"""Experiment tracking: the results.json contract, W&B logging and sweep reports."""
