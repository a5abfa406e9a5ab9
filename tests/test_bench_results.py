"""Every benchmark table lands in benchmarks/results/<name>.md with the command, commit and machine
that made it (the benchmarks' own measurements are too slow for unit tests: their jobs are stubbed)."""
import json
import sys

import pytest
import torch

from benchmarks import common, compare_pruners, encoder_kfold, encoder_stat, stat_vs_paper


@pytest.fixture
def results(tmp_path, monkeypatch):
    """The results folder, moved into tmp_path."""
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    return tmp_path / "results"


def test_a_printed_table_is_the_recorded_one(results, capsys):
    path = common.report_table("demo", [{"pruner": "stat", "ppl": 12.345}], "64 x 256 calibration tokens.")
    text = path.read_text()
    assert path == results / "demo.md"
    assert "| pruner | ppl |\n|---|---|\n| stat | 12.3 |" in text and "64 x 256 calibration tokens." in text
    assert f"Commit: {common.MEASURED_AT}" in text and "Machine: " in text and "Command: `python -m " in text
    assert "| stat | 12.3 |" in capsys.readouterr().out


def fail_job(overrides, out):
    return "RuntimeError: stubbed job"


@pytest.mark.parametrize("module, args, row", [
    (compare_pruners, ["--pruners", "stat", "--flops", "0.5", "--variants"],
     "| stat  | 0.5 | - | - | failed: RuntimeError: stubbed job | - | - |"),
    (stat_vs_paper, [], "| polarity | glue/accuracy | 0.5 | failed: RuntimeError: stubbed job | failed: "),
], ids=["compare_pruners", "stat_vs_paper"])
def test_job_benchmarks_record_their_table(module, args, row, results, tmp_path, monkeypatch):
    monkeypatch.setattr(module, "run_job", fail_job)
    monkeypatch.setattr(encoder_stat, "ensure_polarity_model", lambda: tmp_path / "polarity")
    name = module.__name__.split(".")[-1]
    monkeypatch.setattr(sys, "argv", [module.__file__, *args, "--out", str(tmp_path / "out")])
    module.main()
    text = (results / f"{name}.md").read_text()
    assert row in text and f"Command: `python -m benchmarks.{name} {' '.join(args)}" in text
    assert (tmp_path / "out" / f"{name}.md").read_text().strip() in text  # the --out copy is the same table


def test_kfold_table_from_a_finished_run_is_recorded(results, tmp_path):
    (tmp_path / "accuracy.json").write_text(json.dumps([{"dense": 0.9, "stat@0.7": 0.8, "kwon@0.7": 0.7}] * 2))
    encoder_kfold.main(["--corpus", "pang_lee", "--pool", "20", "--folds", "2", "--flops", "0.7",
                        "--methods", "stat", "kwon", "--table-from", str(tmp_path)])
    text = (results / "encoder_kfold.md").read_text()
    assert "| stat | 0.7 | 0.800 |" in text and "2 of 2 folds of 10 finished" in text


def test_stat_scale_extrapolates_each_job_along_the_calibration_size():
    """Calibrate + prune = 100 s + 2 s per sequence, the forward 1.5 s per sequence: at the auto size
    (40 tokens per unit of a 256-unit model = 40 sequences of 256) the ratio is (100 + 80) / 60."""
    from benchmarks import stat_scale

    def job(n: int) -> dict:
        return {"timing_s": {"calibrate": 1.5 * n, "prune": 100 + 0.5 * n},
                "plan": {"calibration": {"knee_tokens_per_unit": 40.0, "largest_rank": 256}}}

    results = {(2, "cpu/spill/dense", n): job(n) for n in (10, 30)}
    forwards = {(2, n): {"forward_s": 1.5 * n} for n in (10, 30)}
    lines = stat_scale._extrapolated(results, forwards, [2], ["cpu/spill/dense", "cpu/spill/dense/off"], [10, 30])
    assert len(lines) == 1 and "100 s + 2.00 s per sequence" in lines[0] and "40 x 256 tokens" in lines[0]
    assert f"**{180 / 60:.2f}**" in lines[0] and "(not measured)" in lines[0]


def test_held_out_windows_follow_the_calibration_windows_whatever_the_counts(tokenizer):
    """The studies' held-out sequences are the windows drawn after the calibration ones, split by
    window: with 5 calibration examples (not a whole batch of 8) none is held out twice or lost."""
    from benchmarks.held_out import calibration_and_held_out, calibration_batches

    calib, held = calibration_and_held_out(tokenizer, 5, 3)
    rows = lambda batches: torch.cat([b["input_ids"] for b in batches])  # noqa: E731
    assert rows(calib).shape[0] == 5 and rows(held).shape[0] == 3
    assert torch.equal(rows(calib), rows(calibration_batches(tokenizer, 5)))
    assert torch.equal(torch.cat([rows(calib), rows(held)]), rows(calibration_batches(tokenizer, 8)))
