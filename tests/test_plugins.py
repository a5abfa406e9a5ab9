"""Parts of one's own through the planner and a whole job: a factorization backend the package does
not know by name and an evaluator of one's own are sized by asking them (their statistics' bytes,
their lengths), and a run with both completes."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from stat_exp.config.cli import compose_config
from stat_exp.config.validate import checked_config
from stat_exp.eval.base import Evaluator
from stat_exp.execution.plan import make_plan
from stat_exp.execution.sizes import MB
from stat_exp.factorize import GramBackend
from stat_exp.parts import build_parts
from stat_exp.types import PositiveInt
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


HERE = "tests.test_plugins"  # importable from the repository root, which run_cli puts on PYTHONPATH
PLUGINS = ["pruner=stat", f"factorization._target_={HERE}.WideBackend",
           f"+eval.params._target_={HERE}.ParamsEval", "eval.params.batch_size=3"]


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


def test_a_job_runs_with_a_users_backend_and_evaluator(tiny_job, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_job.args(f"hydra.run.dir={run_dir}", *PLUGINS), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "ok" and record["factorization"] == "wide"
    assert record["metrics"]["params/count"] > 0 and "perplexity/ppl" in str(record["metrics"])
