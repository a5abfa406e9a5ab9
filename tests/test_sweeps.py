"""Real sweeps on a tiny saved model: failures counted where the sweep is launched (every launcher),
resume after a failure or a kill, a plug-in pruner from a config dir outside the package, and an
optuna search that uses the metric each job returns."""
from __future__ import annotations

import json

import pytest
import yaml

from stat_exp.track.report import outcome
from tests.jobs import kill_once_plugin, run_cli, statuses


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local"])
def test_a_failed_job_fails_the_sweep_under_every_launcher(tiny_job, tmp_path, launcher):
    sweep = tmp_path / "sweep"
    missing = tmp_path / "missing.txt"
    proc = run_cli(["-m", *tiny_job.args(f"hydra.sweep.dir={sweep}", f"hydra/launcher={launcher}",
                                         **{"eval.perplexity.text_file": f"{tiny_job.text},{missing}"})], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert statuses(sweep) == {"0": "ok", "1": "failed"}
    listing = proc.stderr.split("1 of 2 job(s) failed:", 1)[1].strip().splitlines()
    assert listing[0].startswith("1: DataError: data file not found") and str(missing) in listing[0]
    report = (sweep / "report.md").read_text()
    assert "| ok |" in report and "| failed |" in report


def test_resume_reruns_only_the_failed_job_and_reports_all(tiny_job, tmp_path):
    sweep, text = tmp_path / "sweep", tmp_path / "later.txt"
    args = ["-m", *tiny_job.args(f"hydra.sweep.dir={sweep}", **{"eval.perplexity.text_file": f"{tiny_job.text},{text}"})]
    assert run_cli(args, tmp_path).returncode == 1
    done = (sweep / "0" / "results.json").read_bytes()
    text.write_text(tiny_job.text.read_text())
    proc = run_cli([*args, "resume=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert statuses(sweep) == {"0": "ok", "1": "ok"}
    assert (sweep / "0" / "results.json").read_bytes() == done  # not run again
    assert "not run again" in (sweep / "0" / "run.log").read_text()
    assert (sweep / "report.md").read_text().count("| ok |") == 2


def test_a_killed_job_is_recorded_failed_and_resume_reruns_it(tiny_job, tmp_path):
    """A plug-in pruner from a config dir outside the package kills its job mid-way: the sweep goes
    on, records the job failed (killed) and exits 1; resume reruns it."""
    flags, env = kill_once_plugin(tmp_path)
    sweep = tmp_path / "sweep"
    args = ["-m", *flags, *tiny_job.args(f"hydra.sweep.dir={sweep}", pruner="kill_once")]
    proc = run_cli(args, tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert statuses(sweep) == {"0": "failed"}
    [(run_dir, error)] = outcome(sweep).failed
    assert run_dir == "0" and error.startswith("killed: its process ended with SIGKILL")
    proc = run_cli([*args, "resume=true"], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((sweep / "0" / "results.json").read_text())
    assert record["status"] == "ok" and record["pruner"] == "kill_once"


def test_optuna_search_uses_the_returned_metric(tiny_job, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "experiment=search_stat", *tiny_job.args(
        f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2", pruner="stat",
        **{"budget.flops": None, "calib.num_examples": None, "calib.seq_len": None})], tmp_path)  # the search's
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    ppls = [json.loads(p.read_text())["metrics"]["perplexity/ppl"] for p in sweep.rglob("results.json")]
    assert len(ppls) == 2 and best["best_value"] == pytest.approx(min(ppls))
    assert set(best["best_params"]) == {"calib.num_examples", "calib.seq_len", "budget.allocation"}


def test_sweeps_over_experiments_get_the_experiment_sweeper_and_one_experiment_keeps_its_own():
    from stat_exp.config.cli import command_line

    assert command_line(["-m", "experiment=glob(*paper)"])[-1] == "hydra/sweeper=experiment"
    assert command_line(["-m", "pruner=stat,none"])[-1] == "hydra/sweeper=experiment"
    assert "hydra/sweeper=experiment" not in command_line(["-m", "experiment=search_stat"])  # optuna, its own
    assert "hydra/sweeper=experiment" not in command_line(["-m", "experiment=demo,compare_pruners", "hydra/sweeper=basic"])
    assert "hydra/sweeper=experiment" not in command_line(["pruner=stat"])
