"""Parts of one's own through the planner and a whole job: a factorization backend the package does
not know by name, a calibration source and an evaluator of one's own are sized by asking them
(their statistics' bytes, their sequence length and count, their lengths), and a run with all three
completes."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from stat_exp.config.cli import compose_config
from stat_exp.config.validate import checked_config
from stat_exp.data.base import Calibration
from stat_exp.eval.base import Evaluator
from stat_exp.execution.plan import make_plan
from stat_exp.execution.sizes import MB
from stat_exp.factorize import GramBackend
from stat_exp.parts import build_parts
from stat_exp.types import PositiveInt, Propagate
from tests.jobs import run_cli

CPU = torch.device("cpu")


class WideBackend(GramBackend):
    """A backend of one's own: Gram statistics, but it says they take three Gram matrices."""

    name = "wide"

    def statistics_bytes(self, dim: int, tokens: int) -> int:
        return 3 * super().statistics_bytes(dim, tokens)


class ParamsEval(Evaluator):
    """An evaluator of one's own: counts parameters; says its forward pass is `batch_size` x `seq_len`."""

    name = "params"

    def __init__(self, batch_size: PositiveInt = 4, seq_len: PositiveInt = 64):
        self.batch_size, self.seq_len = batch_size, seq_len

    def lengths(self) -> tuple[int, int]:
        return self.batch_size, self.seq_len

    def __call__(self, model, tokenizer, device) -> dict[str, float]:
        return {"params/count": float(sum(p.numel() for p in model.parameters()))}


@dataclass
class StridedWindows(Calibration):
    """A calibration source of one's own: windows of `seq_len` tokens every `stride` tokens of a text
    file, in order (`stride` is no option of the packaged sources)."""

    source: str = ""
    stride: int = 64
    num_examples: int = 8
    seq_len: int = 32
    batch_size: int = 2
    seed: int = 0
    propagate: Propagate = "dense"

    @property
    def longest_sequence(self) -> int:
        return self.seq_len

    def batches(self, tokenizer, num_examples: int | None = None) -> list[dict[str, torch.Tensor]]:
        n = num_examples or self.num_examples
        ids = tokenizer(Path(self.source).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
        windows = torch.stack([ids[i * self.stride: i * self.stride + self.seq_len] for i in range(n)])
        return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(self.batch_size)]


HERE = "tests.test_plugins"  # importable from the repository root, which run_cli puts on PYTHONPATH
PLUGINS = ["pruner=stat", f"factorization._target_={HERE}.WideBackend",
           f"+eval.params._target_={HERE}.ParamsEval", "eval.params.batch_size=3",
           f"calib._target_={HERE}.StridedWindows", "+calib.stride=40", "calib.num_examples=6", "calib.seq_len=24"]


def _plan(tiny_job, tmp_path, *overrides: str):
    cfg = OmegaConf.create(checked_config(compose_config(tiny_job.args(*overrides))))
    return make_plan(cfg, build_parts(cfg, CPU, tmp_path), CPU, tmp_path)


def _row(plan, what: str) -> float:
    return next(mb for name, mb in plan.rows if name.startswith(what))


def test_the_planner_asks_a_users_backend_and_evaluator_for_their_sizes(tiny_job, tmp_path):
    plan = _plan(tiny_job, tmp_path, *PLUGINS)
    gram = _plan(tiny_job, tmp_path, "pruner=stat")
    assert _row(plan, "statistics") == pytest.approx(3 * _row(gram, "statistics"))
    vocab = json.loads((tiny_job.model_dir / "config.json").read_text())["vocab_size"]
    largest = max(3 * 64, 32 * 8)  # ParamsEval's 3 x 64 against perplexity's 8 x 32 tokens
    assert _row(plan, "evaluation logits") == pytest.approx(largest * vocab * 4 * 3 / MB)
    assert plan.calibration.num_examples == 6 and plan.calibration.tokens == 6 * 24


def test_a_job_runs_with_a_users_backend_and_evaluator(tiny_job, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_job.args(f"hydra.run.dir={run_dir}", *PLUGINS), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "ok" and record["factorization"] == "wide"
    assert record["calibration"]["tokens"] == 6 * 24  # fewer than 8 held-out examples: all calibrate
    assert record["metrics"]["params/count"] > 0 and "perplexity/ppl" in str(record["metrics"])
