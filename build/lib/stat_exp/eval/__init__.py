"""Evaluation: perplexity, lm_eval bridge, GLUE-style tasks, embedding benchmarks, latency."""
