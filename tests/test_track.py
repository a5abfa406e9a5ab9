"""Tracking: the results.json contract, offline W&B runs kept inside the run directory, sweep reports."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import DictConfig, OmegaConf

from stat_exp.track.callbacks import SweepReport
from stat_exp.track.report import choose_metric, collect, to_table, write_report
from stat_exp.track.results import (
    RESULTS_FILE,
    RunRecord,
    Timings,
    config_hash,
    validate_results,
    write_json_atomic,
)
from stat_exp.track.wandb_logger import NullLogger, WandbLogger, make_logger, sweep_group

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


def test_config_hash_is_stable_and_ignores_logger_and_hydra():
    cfg = {"model": {"name": "tiny"}, "budget": {"flops": 0.7}, "logger": {"name": "none"}}
    assert config_hash(cfg) == config_hash(dict(reversed(cfg.items())))
    assert config_hash(cfg) != config_hash(cfg | {"budget": {"flops": 0.6}})
    assert config_hash(cfg) == config_hash(cfg | {"logger": {"name": "wandb"}, "hydra": {"x": 1}})


def test_timings_accumulate():
    timings = Timings()
    for _ in range(2):
        with timings("prune"):
            pass
    with pytest.raises(RuntimeError), timings("eval"):
        raise RuntimeError
    assert set(timings.seconds) == {"prune", "eval"} and timings.seconds["prune"] >= 0


# W&B


def test_wandb_offline_keeps_files_in_run_dirs(home, tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-25_04-30-00"
    cfg = {"name": "wandb", "project": "stat-exp-test", "mode": "offline", "group": None, "tags": ["t"]}
    loggers = []
    for job in ("0", "1"):
        logger = make_logger(cfg, sweep / job, {"pruner": "stat"}, sweep_dir=sweep, job_name=f"job{job}")
        assert isinstance(logger, WandbLogger)
        loggers.append(logger)
        with logger:
            logger.log_metrics({"wiki/ppl": 20.0})
            logger.log_structure({"heads": [2, 1], "neurons": [8, 4]})
            logger.log_table("rows", [{"a": 1, "b": 2.0}])
        logger.finish("ok")  # a second finish is a no-op
    assert sweep_group(sweep) == "multirun-2026-11-25_04-30-00"
    assert files_under(home) == []
    for job in ("0", "1"):
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and (runs[0] / "files").is_dir()
    assert not (tmp_path / "wandb").exists()


def test_wandb_logger_context_finishes_failed_run(home, tmp_path):
    import wandb

    with pytest.raises(RuntimeError), WandbLogger("stat-exp-test", tmp_path / "job", {"a": 1}) as logger:
        assert wandb.run is not None
        raise RuntimeError("job failed")
    assert wandb.run is None
    logger.finish("failed")
    assert files_under(home) == []


def test_make_logger_none_and_unknown(tmp_path):
    assert isinstance(make_logger({"name": "none"}, tmp_path, {}), NullLogger)
    assert isinstance(make_logger(None, tmp_path, {}), NullLogger)
    with pytest.raises(ValueError, match="wandb, none"):
        make_logger({"name": "mlflow"}, tmp_path, {})


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


def test_report_metric_choice(sweep):
    columns = list(to_table(collect(sweep), "wiki/ppl").columns)
    assert columns.index("wiki/ppl") < columns.index("acc/accuracy")
    assert write_report(sweep, "acc/accuracy")["png"].exists()
    with pytest.raises(ValueError, match="available: acc/accuracy, wiki/ppl"):
        write_report(sweep, "missing/metric")


def sweep_config(sweep_dir: Path, logger: dict) -> DictConfig:
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}, "logger": logger})


def test_sweep_report_callback(sweep, capsys):
    config = sweep_config(sweep, {"name": "none"})
    SweepReport().on_multirun_end(config=config)
    assert (sweep / "report.csv").exists() and (sweep / "report.png").exists()
    assert "wanda_sp" in capsys.readouterr().out


def test_sweep_report_callback_never_raises(tmp_path, capsys):
    config = sweep_config(tmp_path / "empty", {"name": "none"})
    SweepReport().on_multirun_end(config=config)
    assert "sweep report failed" in capsys.readouterr().err


def test_report_logged_to_wandb(home, sweep):
    paths = write_report(sweep)
    config = sweep_config(sweep, {"name": "wandb", "mode": "offline"})
    SweepReport().on_multirun_end(config=config)
    runs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and paths["csv"].exists()
    assert files_under(home) == []
