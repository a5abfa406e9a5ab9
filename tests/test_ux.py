"""What a person sees: the summary a run ends with, `stat-exp --help`, the report over any runs, and
the figures (axes, scales, what each layer kept)."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from stat_exp.track.plots import axis_label, structure_plot, wants_log_scale
from stat_exp.track.report_cli import main as report_main
from stat_exp.track.results import RESULTS_FILE, RunRecord
from stat_exp.track.summary import LONG_JOB_S, plan_line, run_summary
from tests.jobs import REPO, run_cli


def test_a_run_ends_with_a_summary_of_what_it_did(tiny_job, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(tiny_job.args(f"hydra.run.dir={run_dir}", logger="csv"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    record = json.loads((run_dir / RESULTS_FILE).read_text())
    assert "tiny pruned by magnitude_sp (uniform) to 0.8 of the FLOPs" in out
    assert f"{record['achieved']['flops_fraction']:.3f} of the FLOPs" in out
    ppl = record["metrics"]["perplexity/ppl"]
    assert f"perplexity/ppl {ppl:.4g}" in out
    assert re.search(r"time: +load [\d.]+ s, calibrate [\d.]+ s, prune [\d.]+ s, eval [\d.]+ s, total", out)
    assert f"results:  {run_dir / RESULTS_FILE}" in out
    assert f"tracking: {run_dir / 'metrics.csv'}" in out and record["tracker"] == str(run_dir / "metrics.csv")
    assert len(out.strip().splitlines()) <= 8  # a few lines, no more
    # what each layer kept, beside results.json, against the dense counts recorded with it
    assert (run_dir / "structure.png").stat().st_size > 0
    assert record["dense_structure"]["neurons"] != record["structure"]["neurons"]


def test_the_summary_says_where_the_model_and_the_device_peak_are(tmp_path):
    record = RunRecord(model="m", pruner="stat", variant="uniform", target={"flops_fraction": 0.5},
                       achieved={"flops_fraction": 0.5012, "params_fraction": 0.61}, metrics={"perplexity/ppl": 71.23},
                       timing_s={"load": 1.0, "total": 3725.0}, peak_rss_mb=2500, peak_device_mb=900,
                       plan={"peak_host_mb": 3000}, tracker="https://wandb.ai/x/y/runs/z").to_dict()
    text = run_summary(record, tmp_path, tmp_path / "model")
    assert text.splitlines()[0] == "m pruned by stat (uniform) to 0.5 of the FLOPs"
    assert "0.501 of the FLOPs, 0.610 of the parameters" in text
    assert "total 1 h 02 min" in text and "load 1.0 s" in text
    assert "peak 2.4 GB host, 900 MB device (planned 2.9 GB host)" in text
    assert f"model:    {tmp_path / 'model'}" in text and "tracking: https://wandb.ai/x/y/runs/z" in text


def test_only_a_long_job_announces_its_plan():
    plan = {"seconds": LONG_JOB_S - 1, "peak_host_mb": 500, "disk_mb": 0, "offload": "none", "stream": "model",
            "factors": "hold", "device": "cpu"}
    assert plan_line(plan) is None
    line = plan_line(plan | {"seconds": 600, "peak_host_mb": 40_000, "disk_mb": 1234, "offload": "disk"})
    assert line == "plan: about 10 min 00 s, peak 39.1 GB host, 1234 MB disk; offload=disk, stream=model, factors=hold"


def test_help_is_our_own_page_with_the_groups_hydra_lists(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("stat-exp: prune a trained transformer without fine-tuning")
    assert "powered by Hydra" not in out
    assert out.count("  stat-exp ") >= 3  # three example commands
    assert re.search(r"^pruner: .*\bstat\b.*\bwanda_sp\b", out, re.M)  # Hydra's own listing of the options
    assert "--cfg job" in out and "README" in out
    assert "execution:" not in out  # no config dump
    assert len(out.splitlines()) < 45


def _job(folder, pruner, flops, ppl, status="ok"):
    record = RunRecord(model="tiny", pruner=pruner, target={"flops_fraction": flops}, status=status,
                       error=None if status == "ok" else "RuntimeError: boom",
                       achieved={"flops_fraction": flops, "params_fraction": flops} if status == "ok" else {},
                       metrics={"perplexity/ppl": ppl} if status == "ok" else {})
    record.write(folder)


def test_report_over_two_sweeps_gives_one_table_and_plot(tmp_path, capsys):
    a, b, out = tmp_path / "monday", tmp_path / "tuesday", tmp_path / "report"
    for i, flops in enumerate((0.9, 0.5)):
        _job(a / str(i), "stat", flops, 20 / flops)
        _job(b / str(i), "wanda_sp", flops, 30 / flops)
    _job(b / "2", "none", 1.0, 18.0)
    _job(b / "3", "flap", 0.5, 0, status="failed")
    report_main([str(a), str(b), str(a / "0"), "--out", str(out)])  # a run given twice counts once
    table = pd.read_csv(out / "report.csv")
    assert len(table) == 6 and set(table["pruner"]) == {"stat", "wanda_sp", "none", "flap"}
    md = (out / "report.md").read_text()
    ok_part, failed_part = md.split("## Failed runs (1)")
    assert "flap" not in ok_part and "RuntimeError: boom" in failed_part and str(b / "3") in failed_part
    assert (out / "report.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [(["nowhere"], "not a folder: nowhere"),
                                           (["{empty}"], "no results.json found"),
                                           (["{sweep}", "--metric", "acc"], "metric 'acc' is in no ok run")])
def test_report_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    _job(tmp_path / "sweep" / "0", "stat", 0.7, 30.0)
    argv = [a.format(empty=tmp_path / "empty", sweep=tmp_path / "sweep") for a in args]
    with pytest.raises(SystemExit) as stop:
        report_main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_report_console_script_is_installed():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'stat-exp-report = "stat_exp.track.report_cli:main"' in pyproject


@pytest.mark.parametrize("metric, label", [("perplexity/ppl", "perplexity (lower is better)"),
                                           ("latency/decode_tokens_per_s", "tokens per second"),
                                           ("glue/acc", "accuracy"), ("latency/prefill_ms", "milliseconds"),
                                           ("custom/thing", None)])
def test_axes_say_units(metric, label):
    text = axis_label(metric)
    assert text.startswith(metric) and (label in text if label else text == metric)


def test_log_scale_for_perplexity_and_wide_ranges():
    assert wants_log_scale("perplexity/ppl", [20, 25])
    assert wants_log_scale("glue/loss", [0.1, 2.0])
    assert not wants_log_scale("glue/acc", [0.5, 0.9])
    assert not wants_log_scale("delta", [-1.0, 20.0])


def test_structure_plot_draws_every_layer(tmp_path):
    import matplotlib.image

    path = tmp_path / "s.png"
    structure_plot({"heads": [3, 6, 9], "neurons": [100, 800, 1536]}, {"heads": [9] * 3, "neurons": [1536] * 3},
                   path, "tiny, stat")
    assert matplotlib.image.imread(path).shape[0] > 200


def test_structure_plot_shows_removed_blocks_as_empty_layers(tmp_path):
    """block_drop's structure lists the kept blocks only; the plot puts them back at their places."""
    import matplotlib.image

    path = tmp_path / "s.png"
    structure_plot({"heads": [9, 9], "neurons": [1536, 1536], "removed_blocks": [1]},
                   {"heads": [9] * 3, "neurons": [1536] * 3}, path)
    assert matplotlib.image.imread(path).shape[0] > 200
