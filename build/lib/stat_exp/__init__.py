"""stat-exp: prune trained transformers without fine-tuning (STAT and baselines)."""
