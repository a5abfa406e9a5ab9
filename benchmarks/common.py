"""Shared set-up for the benchmarks: the embedded SmolLM2 and its calibration batches."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from stat_exp.data.calibration import calibration_batches  # noqa: E402
from stat_exp.models.loading import load_model  # noqa: E402

CPU = torch.device("cpu")


def smollm2(num_examples: int = 64, seq_len: int = 256, batch_size: int = 8):
    """(model, tokenizer, calibration batches) on the embedded SmolLM2-135M and wiki calibration text."""
    model, tok = load_model("smollm2_135m")
    return model, tok, calibration_batches(tok, "wiki_calib", num_examples, seq_len, 0, batch_size)


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
