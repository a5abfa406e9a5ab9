"""Fine-tuning an encoder into the task model a GLUE or sentiment study prunes (not part of pruning)."""
