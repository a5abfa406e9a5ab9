"""Tracking: the results.json contract, offline W&B runs kept inside the run directory, sweep reports."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import DictConfig, OmegaConf

from stat_exp.track import wandb_logger
from stat_exp.track.callbacks import SweepReport
from stat_exp.track.logger import NullLogger, make_logger, metric_tables, run_name
from stat_exp.track.report import choose_metric, collect, to_table, write_report
from stat_exp.track.results import (
    RESULTS_FILE,
    RunRecord,
    Timings,
    config_hash,
    validate_results,
    write_json_atomic,
)
from stat_exp.track.wandb_logger import WandbLogger, wandb_env

WANDB_ENV = (
    "WANDB_DIR", "WANDB_MODE", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR",
    "WANDB_ARTIFACT_DIR", "WANDB_SILENT", "WANDB_DISABLE_GIT", "WANDB_DISABLE_CODE",
)


def record(pruner="stat", flops=0.7, ppl=25.0, status="ok", **extra) -> dict:
    rec = RunRecord(
        status=status,
        error="boom" if status == "failed" else None,
        model="tiny",
        pruner=pruner,
        factorization="gram",
        target={"flops_fraction": flops},
        achieved={"flops_fraction": flops - 0.01, "params_fraction": flops + 0.03},
        structure={"heads": [2, 1], "kv_heads": [1, 1], "neurons": [30, 20]},
        metrics={} if status == "failed" else {"acc/accuracy": 0.5, "wiki/ppl": ppl},
        timing_s={"prune": 1.5, "total": 3.0},
        peak_rss_mb=100.0,
        seed=0,
        config_hash="abc",
    ).to_dict()
    return rec | extra


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh HOME and no WANDB_* variables, restored after the test whatever the logger sets."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in WANDB_ENV:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    return home


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


# results.json


def test_write_json_atomic_replaces_and_keeps_old_file_on_error(tmp_path):
    path = tmp_path / RESULTS_FILE
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == [RESULTS_FILE]


def test_run_record_round_trip_validates(tmp_path):
    rec = RunRecord(model="tiny", pruner="stat", metrics={"wiki/ppl": 12.0}, seed=1)
    path = rec.write(tmp_path)
    loaded = json.loads(path.read_text())
    validate_results(loaded)
    assert loaded["status"] == "running" and "torch" in loaded["versions"]
    validate_results(record(status="failed"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("metrics"), "missing key 'metrics'"),
        (lambda d: d.update(status="done"), "'status'"),
        (lambda d: d.update(metrics={"wiki/ppl": "12"}), "'metrics'"),
        (lambda d: d.update(seed=True), "'seed'"),
        (lambda d: d.update(status="failed", error=None), "'error'"),
    ],
)
def test_validate_results_names_the_bad_key(change, message):
    bad = record()
    change(bad)
    with pytest.raises(ValueError, match=message):
        validate_results(bad)


def test_config_hash_is_stable_and_ignores_what_does_not_change_results():
    cfg = {"model": {"name": "tiny"}, "budget": {"flops": 0.7}, "logger": {"name": "none"}, "resume": False}
    assert config_hash(cfg) == config_hash(dict(reversed(cfg.items())))
    assert config_hash(cfg) != config_hash(cfg | {"budget": {"flops": 0.6}})
    assert config_hash(cfg) == config_hash(cfg | {"logger": {"name": "wandb"}, "hydra": {"x": 1}, "resume": True,
                                                  "progress": False, "objective": "perplexity/ppl"})


def test_timings_accumulate():
    timings = Timings()
    for _ in range(2):
        with timings("prune"):
            pass
    with pytest.raises(RuntimeError), timings("eval"):
        raise RuntimeError
    assert set(timings.seconds) == {"prune", "eval"} and timings.seconds["prune"] >= 0


# loggers


WANDB = "stat_exp.track.wandb_logger.WandbLogger"
CONFIG = {"model": {"name": "tiny"}, "pruner": {"_target_": "stat_exp.prune.stat.StatPruner"},
          "factorization": {"_target_": "stat_exp.factorize.GramBackend"}, "budget": {"flops": 0.7},
          "eval": {"perplexity": {"_target_": "x"}}}


def test_wandb_offline_keeps_files_in_run_dirs_and_names_what_ran(home, tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-25_04-30-00"
    for job in ("0", "1"):
        logger = make_logger({"_target_": WANDB, "project": "stat-exp-test", "tags": ["mine"]}, sweep / job, CONFIG,
                             sweep_dir=sweep, name=run_name("tiny", "stat (no correction)", 0.7))
        assert isinstance(logger, WandbLogger)
        run = logger._run
        assert run.name == "tiny stat (no correction) @0.7" and run.group == "multirun-2026-11-25_04-30-00"
        assert set(run.tags) == {"tiny", "StatPruner", "GramBackend", "flops=0.7", "perplexity", "mine"}
        assert logger.location.startswith(str(sweep / job / "wandb" / "offline-run-"))  # the run's summary says so
        assert logger.location.endswith("uploads it)")
        with logger:
            logger.log_metrics({"lm_eval/piqa/acc": 0.6, "lm_eval/piqa/acc_stderr": 0.01, "perplexity/ppl": 20.0})
            logger.log_structure({"heads": [2, 1], "neurons": [8, 4]})
            results = RunRecord(model="tiny", pruner="stat").write(sweep / job)
            logger.log_file(results)
        logger.finish("ok")  # a second finish is a no-op
    assert files_under(home) == []
    for job in ("0", "1"):
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and (runs[0] / "files" / RESULTS_FILE).is_file()
    assert not (tmp_path / "wandb").exists()


def test_metric_tables_hold_per_task_results():
    tables = metric_tables({"lm_eval/piqa/acc": 0.6, "lm_eval/piqa/acc_stderr": 0.01, "lm_eval/boolq/acc": 0.7,
                            "perplexity/ppl": 20.0})
    assert tables == {"lm_eval": [{"task": "piqa", "metric": "acc", "value": 0.6, "stderr": 0.01},
                                  {"task": "boolq", "metric": "acc", "value": 0.7, "stderr": None}]}


def test_a_failed_run_logs_its_error(home, tmp_path):
    import wandb

    summary = {}
    with pytest.raises(RuntimeError), WandbLogger(tmp_path / "job", {"a": 1}, project="stat-exp-test") as logger:
        finish = logger._run.finish
        logger._run.finish = lambda **kw: (summary.update(logger_run.summary), finish(**kw))
        logger_run = logger._run
        raise RuntimeError("job failed")
    assert wandb.run is None
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: job failed"
    assert files_under(home) == []


def test_online_mode_keeps_the_users_wandb_settings(tmp_path, monkeypatch):
    """Offline runs point wandb's folders into the run; online ones restore the user's (their settings
    file holds host and entity), also after an offline run in the same process."""
    monkeypatch.setitem(wandb_logger._USER_DIRS, "WANDB_CONFIG_DIR", "/home/me/.config/wandb")
    monkeypatch.setitem(wandb_logger._USER_DIRS, "WANDB_CACHE_DIR", None)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    wandb_env(tmp_path / "wandb", "offline")
    assert os.environ["WANDB_CONFIG_DIR"] == str((tmp_path / "wandb" / "config").resolve())
    wandb_env(tmp_path / "wandb", "online")
    assert os.environ["WANDB_CONFIG_DIR"] == "/home/me/.config/wandb" and "WANDB_CACHE_DIR" not in os.environ


def test_csv_logger_and_null_logger(tmp_path):
    logger = make_logger({"_target_": "stat_exp.track.csv_logger.CsvLogger"}, tmp_path, CONFIG, name="job")
    with logger:
        logger.log_metrics({"perplexity/ppl": 20.0})
        logger.log_structure({"heads": [2], "neurons": [8]})
    rows = list(csv.reader((tmp_path / "metrics.csv").open()))
    assert ["1", "perplexity/ppl", "20.0"] in rows and ["2", "structure/neurons/0", "8"] in rows
    assert rows[-1][1:] == ["status", "ok"]
    assert isinstance(make_logger({"_target_": "stat_exp.track.logger.NullLogger"}, tmp_path, {}), NullLogger)


# sweep reports


@pytest.fixture
def sweep(tmp_path) -> Path:
    sweep = tmp_path / "multirun" / "2026-11-25_04-30-00"
    jobs = [record("none", 1.0, 20.0)]
    jobs += [record("stat", f, 20.0 / f) for f in (0.8, 0.6)]
    jobs += [record("stat", 0.6, 40.0, variant="no correction")]
    jobs += [record("wanda_sp", f, 30.0 / f) for f in (0.8, 0.6)]
    jobs += [record("random", 0.6, status="failed")]
    for i, job in enumerate(jobs):
        write_json_atomic(sweep / str(i) / RESULTS_FILE, job)
    return sweep


def test_report_tables_and_plot(sweep):
    records = collect(sweep)
    assert len(records) == 7
    assert choose_metric(records) == "wiki/ppl"
    paths = write_report(sweep)
    df = pd.read_csv(paths["csv"])
    assert len(df) == 7
    assert list(df["pruner"]) == [
        "none", "random", "stat", "stat", "stat (no correction)", "wanda_sp", "wanda_sp"
    ]
    assert list(df.loc[df["pruner"] == "stat", "target_flops"]) == [0.8, 0.6]
    assert df.loc[df["pruner"] == "random", "status"].item() == "failed"
    expected = {"achieved_flops", "achieved_params", "wiki/ppl", "acc/accuracy", "prune_s", "total_s"}
    assert expected <= set(df.columns)
    md = paths["md"].read_text()
    assert "| pruner | model |" in md and "stat (no correction)" in md and "failed" in md
    assert paths["png"].stat().st_size > 1000


def test_copies_of_results_inside_a_job_folder_are_not_jobs(sweep):
    """logger=wandb attaches results.json to the run, and W&B keeps a copy under the job's wandb/."""
    job = json.loads((sweep / "0" / RESULTS_FILE).read_text())
    write_json_atomic(sweep / "0" / "wandb" / "offline-run-1" / "files" / RESULTS_FILE, job)
    assert sorted(r["run_dir"] for r in collect(sweep)) == [str(i) for i in range(7)]


def test_report_metric_choice(sweep):
    columns = list(to_table(collect(sweep), "wiki/ppl").columns)
    assert columns.index("wiki/ppl") < columns.index("acc/accuracy")
    assert write_report(sweep, "acc/accuracy")["png"].exists()
    with pytest.raises(ValueError, match="available: acc/accuracy, wiki/ppl"):
        write_report(sweep, "missing/metric")


def sweep_config(sweep_dir: Path, logger: dict) -> DictConfig:
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}, "logger": logger})


def test_sweep_report_callback(sweep, capsys):
    config = sweep_config(sweep, {"_target_": "stat_exp.track.logger.NullLogger"})
    SweepReport().on_multirun_end(config=config)
    assert (sweep / "report.csv").exists() and (sweep / "report.png").exists()
    assert "wanda_sp" in capsys.readouterr().out


def test_sweep_report_callback_never_raises(tmp_path, capsys):
    config = sweep_config(tmp_path / "empty", {"_target_": "stat_exp.track.logger.NullLogger"})
    SweepReport().on_multirun_end(config=config)
    assert "sweep report failed" in capsys.readouterr().err


def test_report_logged_to_wandb(home, sweep):
    paths = write_report(sweep)
    config = sweep_config(sweep, {"_target_": WANDB, "project": "stat-exp-test"})
    SweepReport().on_multirun_end(config=config)
    runs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and paths["csv"].exists()
    assert files_under(home) == []


def test_the_results_schema_checks_every_field_of_the_record():
    """validate_results knows every RunRecord field (a new field needs its check), and rejects a bad one."""
    import dataclasses

    from stat_exp.track.results import _SCHEMA

    assert list(_SCHEMA) == [f.name for f in dataclasses.fields(RunRecord)]
    bad = record() | {"execution": {"offload": 1}}
    with pytest.raises(ValueError, match="'execution' must be a dict of strings"):
        validate_results(bad)
