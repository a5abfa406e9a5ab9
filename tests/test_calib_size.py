"""`calib.num_examples=auto` and the check that the calibration was large enough (held-out over
in-sample error of the FFN correction), on tiny models."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from omegaconf import OmegaConf

from stat_exp.config.cli import compose_config
from stat_exp.config.validate import checked_config
from stat_exp.data.calib_size import (KNEE_TOKENS_PER_UNIT, CalibrationSize, auto_examples, examples_for_tokens,
                                      knee_tokens, largest_rank, resolved)
from stat_exp.data.calibration import TextCalibration
from stat_exp.data.glue import GlueCalibration
from stat_exp.data.text import DataError
from stat_exp.factorize import GramBackend, QRBackend
from stat_exp.models import get_adapter
from stat_exp.execution import plan as execution_plan
from stat_exp.models.flops import LayerShape, shapes_of
from stat_exp.pipeline import build_parts, run_pipeline
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.calibration_check import KEY, WARN_RATIO, OverfitCheck, overfit_warning
from stat_exp.prune.held_out import HeldOutAccumulator
from stat_exp.prune.runner import PruneRunner
from stat_exp.prune.stat import StatPruner
from tests.tiny import batches, clone, tiny_llama

CPU = torch.device("cpu")


def _config(tiny_job, *overrides: str):
    """The checked config of a job on the tiny saved Llama (hidden 32, FFN 64) and its text file."""
    return OmegaConf.create(checked_config(compose_config(tiny_job.args(*overrides, **{"calib.num_examples": None}))))


def make_plan(cfg, device: torch.device):
    return execution_plan.make_plan(cfg, build_parts(cfg, device, None), device)


def test_the_knee_is_the_studys_point_and_follows_the_widest_layer():
    assert knee_tokens(1536) == 256 * 256  # the study: 256 x 256 tokens for SmolLM2's 1,536 neurons
    assert knee_tokens(11008) == 469_675  # Llama-2-7B
    assert largest_rank(shapes_of(get_adapter(tiny_llama(hidden=64, ffn=128)))) == 128
    wide_attention = LayerShape(hidden=64, num_heads=16, num_kv_heads=16, head_dim=16, ffn_width=96, ffn_matrices=3)
    assert largest_rank([wide_attention]) == 256


def test_auto_resolves_to_the_knee_in_the_plan(tiny_job):
    plan = make_plan(_config(tiny_job, "pruner=stat"), CPU)
    size = plan.calibration
    # FFN 64 units -> ceil(65,536 / 1,536 x 64) = 2,731 tokens -> 86 windows of 32 tokens
    assert (size.num_examples, size.tokens, size.largest_rank, size.auto, size.capped_by) == (86, 86 * 32, 64, True,
                                                                                              None)
    assert size.warning() is None and plan.summary()["calibration"]["tokens_per_unit"] == 43.0


def test_an_explicit_count_is_kept_and_warned_about_when_below_the_knee(tiny_job):
    size = make_plan(_config(tiny_job, "pruner=stat", "calib.num_examples=4"), CPU).calibration
    assert (size.num_examples, size.auto, size.capped_by) == (4, False, None)
    assert "2.0 per unit of the largest rank (64" in size.warning()


def test_auto_is_capped_by_the_planned_time_and_says_so(tiny_job):
    size = make_plan(_config(tiny_job, "pruner=stat", "execution.tflops=1e-9"), CPU).calibration
    assert (size.num_examples, size.capped_by) == (2, "time")  # the floor: as many tokens as units (64 / 32)
    assert "capped by the planner's time" in size.warning()


def test_auto_takes_the_largest_count_the_bounds_accept():
    size = auto_examples(1536, 256, lambda n: "memory" if n > 100 else None)
    assert (size.num_examples, size.tokens, size.capped_by) == (100, 25_600, "memory")
    assert auto_examples(1536, 256, lambda n: None).num_examples == 256


def test_auto_must_be_resolved_before_drawing_and_padded_sources_count_real_tokens(tokenizer):
    with pytest.raises(DataError, match="resolved by the planner"):
        resolved("auto")
    assert TextCalibration("wiki_calib", "auto", 256).examples_for(tokenizer, 65_536) == 256
    assert examples_for_tokens(sample_tokens=2_700, sample_examples=100, tokens=65_536) == 2_428  # 27 a sentence
    glue = GlueCalibration("pang_lee", max_length=128)
    n = glue.examples_for(tokenizer, 2_731)
    drawn = glue.batches(tokenizer, num_examples=n)
    real = sum(int(b["attention_mask"].sum()) for b in drawn)
    assert 50 < n < 150 and abs(real / len(drawn[0]["input_ids"]) / len(drawn) - 2_731 / n) < 10


def _pruned_report(tokens_per_batch: int, pruner: StatPruner | None = None, backend=None) -> dict:
    model = tiny_llama(hidden=64, ffn=128)
    runner = PruneRunner(pruner or StatPruner(), BudgetSpec(flops=0.6, seq_len=32), backend or GramBackend(),
                         progress=False)
    data = batches(n=8, batch=1 if tokens_per_batch < 64 else tokens_per_batch // 64,
                   seq=min(tokens_per_batch, 64))
    return runner.run(model, get_adapter(model), data, CPU).diagnostics


def test_the_overfit_check_is_recorded_and_grows_when_calibration_is_too_small():
    small, large = _pruned_report(24)[KEY], _pruned_report(2048)[KEY]
    assert set(small) == {"total", "median", "worst", "worst_layer", "per_layer"} and len(small["per_layer"]) == 2
    assert 0.8 < large["total"] < WARN_RATIO < small["total"]  # ample calibration: about 1
    assert small["worst"] >= small["median"] and small["worst"] == max(r for r in small["per_layer"] if r)
    assert overfit_warning({KEY: small}).startswith("calibration looks too small") and not overfit_warning({KEY: large})


def test_the_check_tells_the_factorization_how_many_tokens_its_grams_sum(monkeypatch):
    """With fewer fit tokens than FFN units the fit Gram is singular: the check passes the count, so
    its factorization skips the lifts that cannot succeed (correction.ridged_cholesky)."""
    from stat_exp.prune import calibration_check

    seen = []
    real = calibration_check.ridged_cholesky
    monkeypatch.setattr(calibration_check, "ridged_cholesky",
                        lambda G, *a, **k: seen.append((G.shape[0], k.get("tokens"))) or real(G, *a, **k))
    _pruned_report(24)  # 8 batches of 24 tokens, a quarter held out: 144 fit tokens, FFN 128 wide
    _pruned_report(16)  # 96 fit tokens: singular
    assert seen and all(tokens is not None for _, tokens in seen)
    assert {tokens for _, tokens in seen} == {144, 96}


def test_the_check_leaves_the_pruned_model_as_it_was():
    """The split statistics sum to the same Gram: the same units are kept, and the folded weights agree."""
    model = tiny_llama(hidden=64, ffn=128)
    with_check, without = clone(model), clone(model)
    for m, pruner in ((with_check, StatPruner()), (without, StatPruner(overfit_check=False))):
        PruneRunner(pruner, BudgetSpec(flops=0.6, seq_len=32), GramBackend(block_dtype="float64"),
                    progress=False).run(m, get_adapter(m), batches(n=8), CPU)
    for a, b in zip(with_check.state_dict().values(), without.state_dict().values()):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_only_the_gram_backend_is_split_for_the_check_alone():
    assert isinstance(StatPruner().accumulator(GramBackend())(8), HeldOutAccumulator)
    assert not isinstance(StatPruner().accumulator(QRBackend())(8), HeldOutAccumulator)
    assert not isinstance(StatPruner(overfit_check=False).accumulator(GramBackend())(8), HeldOutAccumulator)
    assert _pruned_report(2048, backend=QRBackend()) == {}


def test_summary_prices_layers_and_skips_those_that_keep_everything():
    check = OverfitCheck()
    check.add(0, inside=[4.0, 1.0, 0.0], outside=[8.0, 3.0, 0.0], kept=1)
    check.add(1, inside=[9.0, 0.0], outside=[9.0, 0.0], kept=1)  # nothing removed
    check.add(2, inside=[2.0, 1.0], outside=[2.0, 1.0], kept=0)
    summary = check.summary()[KEY]
    assert summary["per_layer"] == [3.0, None, 1.0] and summary["worst_layer"] == 0
    assert math.isclose(summary["total"], (3.0 + 2.0) / (1.0 + 2.0), abs_tol=1e-4)


def test_a_run_records_the_size_and_the_check_and_warns_in_one_line(tiny_job, tmp_path, caplog):
    cfg = _config(tiny_job, "pruner=stat", "calib.num_examples=8", "calib.batch_size=2")
    with caplog.at_level(logging.WARNING, logger="stat_exp.pipeline"):
        run_pipeline(cfg, tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())["calibration"]
    assert (record["num_examples"], record["tokens"], record["auto"], record["largest_rank"]) == (8, 256, False, 64)
    assert record["knee_tokens_per_unit"] == round(KNEE_TOKENS_PER_UNIT, 2) and KEY in record
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("calibration has 256 tokens") for w in warnings)
    assert all("\n" not in w for w in warnings)


def test_a_warning_is_one_line_naming_the_fix():
    line = CalibrationSize(num_examples=4, tokens=1024, largest_rank=1536, auto=True, capped_by="memory").warning()
    assert "\n" not in line and "capped by the planner's memory" in line and "calib.num_examples" in line
