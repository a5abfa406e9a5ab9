"""The command line: every config composes, bad input is one line with exit code 2, and the
documented command runs end to end on the embedded SmolLM2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from stat_exp.assets import cache_dir
from stat_exp.data.text import load_text
from stat_exp.errors import UserError
from stat_exp.eval.perplexity import perplexity
from stat_exp.export.load import load_pruned
from stat_exp.run import CONF_DIR, check_overrides, group_options
from stat_exp.track.results import validate_results

GROUPS = ["model", "calib", "pruner", "budget", "factorization", "eval", "logger"]
# options that only make sense together with others (a GLUE calibration needs a GLUE task)
COMPANIONS = {("calib", "glue"): ["eval=glue", "eval.glue.task=sst2"]}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
       "STAT_EXP_CACHE": str(cache_dir())}  # keeps the prepared assets when a test moves HOME


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=False)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_config_composes_and_instantiates(group, option):
    cfg = _compose([f"{group}={option}", *COMPANIONS.get((group, option), [])])
    if group in ("pruner", "factorization", "calib") or (group == "eval" and option == "perplexity"):
        assert instantiate(cfg[group]) is not None


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    assert cfg.model.name


def test_unknown_names_are_one_line_listing_the_valid_ones():
    for arg, valid in [("pruner=nope", "magnitude_sp"), ("model=gpt5", "smollm2_135m"), ("eval=bleu", "perplexity"),
                       ("pruner=stat,nope", "stat")]:
        with pytest.raises(UserError, match=f"unknown .* 'nope|gpt5|bleu'; valid: .*{valid}"):
            check_overrides([arg])
    check_overrides(["pruner=stat,magnitude_sp", "budget.flops=0.5", "experiment=glob(*)"])


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stat_exp.run", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args,message", [
    (["pruner=nope"], "unknown pruner 'nope'; valid:"),
    (["budget.flops=1.5", "logger=none"], "budget.flops=1.5 must be a number in (0, 1]"),
    (["eval.perplexity.text_file=/no/such/file.txt", "pruner=none", "logger=none"], "/no/such/file.txt"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    run_dir = tmp_path / "run"
    proc = _run([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in proc.stderr
    results = run_dir / "results.json"
    if results.exists():  # a failed run never leaves status ok behind
        assert json.loads(results.read_text())["status"] == "failed"


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(load_text("wiki_eval")[:40_000])
    return path


@pytest.mark.e2e
def test_documented_command_runs_and_saves_a_reloadable_model(tmp_path, eval_text):
    run_dir = tmp_path / "run"
    proc = _run(["model=smollm2_135m", "pruner=magnitude_sp", "budget.flops=0.7", "calib.num_examples=8",
                 "calib.seq_len=128", "eval=perplexity", f"eval.perplexity.text_file={eval_text}", "eval.perplexity.seq_len=256",
                 "eval.perplexity.max_tokens=1024", "logger=none", "save_model=true", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    validate_results(results)
    assert results["status"] == "ok" and results["pruner"] == "magnitude_sp"
    assert results["achieved"]["flops_fraction"] == pytest.approx(0.7, abs=0.01)
    model = load_pruned(run_dir / "model")
    assert sum(p.numel() for p in model.parameters()) == results["achieved"]["params"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    again = perplexity(model, tok, eval_text.read_text(), 256, 1024, 8, progress=False)
    assert again["ppl"] == pytest.approx(results["metrics"]["perplexity/ppl"], rel=1e-4)


@pytest.mark.e2e
def test_stat_run_logs_to_wandb_inside_the_run_dir(tmp_path, eval_text):
    run_dir = tmp_path / "run"
    home = tmp_path / "home"
    env_home = {"HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "stat_exp.run", "pruner=stat", "budget.flops=0.8",
                           "calib.num_examples=16", "calib.seq_len=128", f"eval.perplexity.text_file={eval_text}",
                           "eval.perplexity.max_tokens=512", "logger=wandb", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, env={**ENV, **env_home}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok" and results["factorization"] == "gram"
    assert len(results["structure"]["neurons"]) == 30
    assert any((run_dir / "wandb").rglob("*.wandb"))
    assert not (home / ".cache" / "wandb").exists() and not (home / ".local" / "share" / "wandb").exists()


@pytest.mark.e2e
def test_a_failed_sweep_job_is_recorded_and_the_others_go_on(tmp_path, eval_text):
    sweep = tmp_path / "sweep"
    proc = _run(["-m", "pruner=none", f"eval.perplexity.text_file={eval_text},/no/such.txt", "eval.perplexity.max_tokens=256",
                 "logger=none", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 1
    statuses = sorted(json.loads(p.read_text())["status"] for p in sweep.rglob("results.json"))
    assert statuses == ["failed", "ok"]
    assert (sweep / "report.md").exists()
