"""Fault injection on tiny models: a killed job on every local launcher, two sweeps into one folder, a
stale job folder, an unreadable results.json, a run into a used folder, a failed save. Each checks
what is on disk and the exit code afterwards."""
from __future__ import annotations

import json
import os

import pytest
from omegaconf import OmegaConf

from stat_exp.config.cli import command_line
from stat_exp.export.save import save_pruned
from stat_exp.pipeline import pruner_name
from stat_exp.track.callbacks import SweepReport
from stat_exp.track.report import outcome
from stat_exp.track.results import RESULTS_FILE, write_json_atomic
from stat_exp.track.run_dir import RunFolderInUse, check_run_dir, free_job_dir
from stat_exp.track.sweep import ManifestJob, add_to_manifest, lock_sweep_dir, start_manifest, unlock_sweep_dir
from tests.jobs import kill_once_plugin, run_cli, statuses


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local"])
def test_a_job_killed_by_sigkill_fails_alone_under_every_launcher(tiny_job, tmp_path, launcher):
    flags, env = kill_once_plugin(tmp_path)
    sweep = tmp_path / "sweep"
    parallel = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []  # the ok job runs beside the killed one
    proc = run_cli(["-m", *flags, *tiny_job.args(f"hydra.sweep.dir={sweep}", f"hydra/launcher={launcher}", *parallel,
                                                 pruner="kill_once,none")], tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert statuses(sweep) == {"0": "failed", "1": "ok"}
    assert "1 of 2 job(s) failed:\n  0: killed: its process ended with SIGKILL" in proc.stderr
    assert "| failed |" in (sweep / "report.md").read_text()


def test_a_second_sweep_into_a_locked_folder_stops_at_once(tiny_job, tmp_path):
    sweep = tmp_path / "sweep"
    lock_sweep_dir(sweep)  # as a running sweep holds it
    try:
        proc = run_cli(["-m", *tiny_job.args(f"hydra.sweep.dir={sweep}")], tmp_path)
    finally:
        unlock_sweep_dir(sweep)
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert str(sweep) in line and f"pid {os.getpid()} on " in line and "started" in line
    assert sorted(p.name for p in sweep.iterdir()) == [".sweep.holder", ".sweep.lock"]  # nothing launched


def record(pruner: str = "magnitude_sp", status: str = "ok") -> dict:
    return {"status": status, "error": None if status == "ok" else "boom", "model": "tiny", "pruner": pruner,
            "metrics": {"perplexity/ppl": 10.0}, "config_hash": "old"}


def test_a_sweep_over_an_earlier_sweeps_folder_counts_only_its_own_jobs(tiny_job, tmp_path):
    """Job 0 of an earlier sweep (with a saved model) is moved aside whole; its failed job 5 is listed
    apart and does not change the exit code."""
    sweep = tmp_path / "sweep"
    write_json_atomic(sweep / "0" / RESULTS_FILE, record("stat"))
    (sweep / "0" / "model").mkdir()
    write_json_atomic(sweep / "5" / RESULTS_FILE, record(status="failed"))
    proc = run_cli(["-m", *tiny_job.args(f"hydra.sweep.dir={sweep}", pruner="none")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not part of this sweep (job folders of earlier sweeps): 5" in proc.stderr
    assert statuses(sweep)["0"] == "ok" and not (sweep / "0" / "model").exists()
    [previous] = (sweep / "0").glob("previous-*")
    assert json.loads((previous / RESULTS_FILE).read_text())["pruner"] == "stat" and (previous / "model").is_dir()
    result = outcome(sweep)
    assert (result.jobs, result.failed, result.earlier) == (1, [], ["5"])
    report = (sweep / "report.md").read_text()
    assert report.count("| none |") == 1 and "| stat |" not in report and "earlier sweeps): 5" in report


def test_an_unreadable_results_json_is_a_failed_job_and_the_report_never_raises(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    start_manifest(sweep, resume=False)
    add_to_manifest(sweep, [ManifestJob(0, "0", [], "a", "stat", "tiny"),
                            ManifestJob(1, "1", [], "b", "wanda_sp", "tiny"),
                            ManifestJob(2, "2", [], None, "random", "tiny")])
    write_json_atomic(sweep / "0" / RESULTS_FILE, record())
    (sweep / "1").mkdir()
    (sweep / "1" / RESULTS_FILE).write_text('{"status": "ok", "metr')  # a disk that filled up mid-write
    SweepReport().on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "logger": None}))
    result = SweepReport.last
    assert result.jobs == 3 and [d for d, _ in result.failed] == ["1", "2"]
    assert result.failed[0][1].startswith("results.json cannot be read: JSONDecodeError")
    assert result.failed[1][1].startswith("no results.json")
    report = (sweep / "report.md").read_text()
    assert "| wanda_sp | tiny |" in report and "| random | tiny |" in report  # config names, not classes
    SweepReport().on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "none")}}}))
    assert "sweep report failed: FileNotFoundError" in capsys.readouterr().err


def test_resume_keeps_only_a_done_job_of_the_same_config(tmp_path):
    job = tmp_path / "0"
    write_json_atomic(job / RESULTS_FILE, record() | {"config_hash": "abc"})
    free_job_dir(job, resume=True, digest="abc")
    assert (job / RESULTS_FILE).exists()
    free_job_dir(job, resume=True, digest="changed")  # the config changed: run again, the old run aside
    assert not (job / RESULTS_FILE).exists() and len(list(job.glob("previous-*/" + RESULTS_FILE))) == 1
    write_json_atomic(job / RESULTS_FILE, record(status="failed") | {"config_hash": "abc"})
    free_job_dir(job, resume=True, digest="abc")  # not ok: run again
    assert not (job / RESULTS_FILE).exists() and len(list(job.glob("previous-*/" + RESULTS_FILE))) == 2


def test_a_run_into_a_folder_holding_a_run_is_refused_in_one_line(tiny_job, tmp_path):
    run_dir = tmp_path / "run"
    write_json_atomic(run_dir / RESULTS_FILE, record() | {"config_hash": "abc"})
    check_run_dir(run_dir, resume=True, digest="abc")  # resume reuses it: nothing runs
    with pytest.raises(RunFolderInUse):
        check_run_dir(run_dir, resume=True, digest="changed")
    proc = run_cli([*tiny_job.args(f"hydra.run.dir={run_dir}", pruner="none")], tmp_path)
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: run folder {run_dir} already holds a run")
    assert sorted(p.name for p in run_dir.iterdir()) == [RESULTS_FILE]  # Hydra wrote nothing there


def test_a_failed_save_leaves_no_partial_folder(tmp_path):
    class Broken:
        def save_pretrained(self, path):
            (path / "half.safetensors").parent.mkdir(parents=True, exist_ok=True)
            (path / "half.safetensors").write_bytes(b"x")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        save_pruned(Broken(), None, tmp_path / "model", "causal_lm")
    assert list(tmp_path.iterdir()) == []


def test_failed_jobs_carry_the_pruners_name_not_its_class():
    assert pruner_name(OmegaConf.create({"pruner": {"_target_": "stat_exp.prune.stat.StatPruner"}})) == "stat"
    assert pruner_name(OmegaConf.create({"pruner": {"_target_": "nowhere.Mine"}})) == "Mine"


def test_the_experiment_sweeper_goes_before_a_trailing_flag():
    line = command_line(["-m", "pruner=stat,none", "--config-dir", "conf"])
    assert line == ["-m", "pruner=stat,none", "hydra/sweeper=experiment", "--config-dir", "conf"]


def test_an_optuna_search_with_a_misconfigured_objective_is_a_failed_sweep(tiny_job, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "experiment=search_stat", *tiny_job.args(
        f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=1", "objective=nope", pruner="none",
        **{"budget.flops": None, "calib.num_examples": None, "calib.seq_len": None})], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert statuses(sweep) == {"0": "failed"}
    assert "1 of 1 job(s) failed:\n  0: ConfigError: objective='nope' is not among this job's metrics" in proc.stderr
    assert "Traceback" not in proc.stderr and (sweep / "report.md").exists()
