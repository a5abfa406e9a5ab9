"""Paper experiments sweep their whole grids (also several chosen in one sweep), dry runs list them
without loading anything, and the sweep report puts published numbers beside measured ones."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from stat_exp.grids import expand, grids_of
from stat_exp.track.published import published_value
from stat_exp.track.report import write_report
from tests.test_cli import ENV

# bert: 6 GLUE models x 4 budgets x 2 pruners + 6 dense, SQuAD v1.1/v2.0 x 4 x 2 + 2 dense; distilbert: GLUE only;
# llama: 5 budgets + dense; opt: OPT-125M and 1.3B x (5 budgets + dense).
PAPER_JOBS = {"bert_glue_paper": 72, "distilbert_glue_paper": 54, "llama2_7b_paper": 6, "opt_paper": 12}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stat_exp.run", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


def _jobs(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if re.match(r"#\d+ dry run", line)]


def test_dry_run_lists_every_paper_grid_and_loads_nothing(tmp_path):
    """The hub is offline and no paper model is cached: a job that loaded anything would fail."""
    sweep = tmp_path / "sweep"
    proc = _run(["-m", "experiment=glob(*paper)", "dry_run=true", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(proc.stdout)
    assert Counter(re.search(r"experiment=(\w+)", j).group(1) for j in jobs) == PAPER_JOBS
    assert len({re.search(r"run_dir=(\S+)", j).group(1) for j in jobs}) == len(jobs) == sum(PAPER_JOBS.values())
    assert sum("(nothing pruned)" in j for j in jobs) == 6 + 2 + 6 + 1 + 2
    squad = [j for j in jobs if "model=bert_base_squad" in j]
    assert len(squad) == 18 and all("eval=[squad (version=" in j for j in squad)
    assert all("seq_len=170" in j and "calib=squad" in j for j in squad if "nothing pruned" not in j)
    pruned_bert = [j for j in jobs if "experiment=bert_glue_paper" in j and "nothing pruned" not in j]
    assert Counter(re.search(r"pruner=(\w+)", j).group(1) for j in pruned_bert) == {"stat_paper": 32, "kwon": 32}
    # the stat_paper switches each grid runs with: as released where a released script made the published
    # numbers (BERT, DistilBERT, OPT; GLUE drawn as prune_bert.py draws), the intended method for Llama
    stat_paper = [j for j in jobs if "pruner=stat_paper" in j]
    released = {e: all("as_released=True" in j for j in stat_paper if f"experiment={e} " in j)
                for e in PAPER_JOBS}
    assert released == {"bert_glue_paper": True, "distilbert_glue_paper": True, "llama2_7b_paper": False,
                        "opt_paper": True}
    assert all("with_replacement=True" in j for j in jobs if "calib=glue" in j)
    assert all("max_length=64" in j for j in jobs if "calib=glue" in j and "_sst2 " in j)
    assert all("allenai/c4" in j for j in jobs if "experiment=opt_paper" in j and "nothing pruned" not in j)
    assert not sweep.exists()  # nothing launched, nothing written
    assert "Traceback" not in proc.stderr and "sweep report failed" not in proc.stderr


def test_command_line_values_replace_an_experiments_grid_values(tmp_path):
    proc = _run(["-m", "experiment=distilbert_glue_paper", "budget.flops=0.5", "dry_run=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = _jobs(proc.stdout)
    assert len(jobs) == 6 * 2 + 6 and all("budget.flops=0.5" in j for j in jobs)  # 6 tasks x 2 pruners, 6 none
    assert Counter(re.search(r"pruner=(\w+)", j).group(1) for j in jobs) == {"stat_paper": 6, "kwon": 6, "none": 6}


def test_a_dry_run_job_writes_no_results_and_a_bad_value_exits_2(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(["dry_run=true", "pruner=stat_paper", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("dry run: ") == 1 and "pruner=stat_paper" in proc.stdout
    assert not (run_dir / "results.json").exists() and not (run_dir / "wandb").exists()
    # a dry run makes every check a run makes before its weights load (stat_exp.preflight)
    proc = _run(["dry_run=true", "model.source=/no/such/model", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2 and "model.source='/no/such/model': no such folder" in proc.stderr
    assert not (run_dir / "results.json").exists()
    proc = _run(["-m", "experiment=llama2_7b_paper", "dry_run=true", "pruner.procedure=nope"], tmp_path)
    assert proc.returncode == 2
    jobs = _jobs(proc.stdout)
    assert len(jobs) == 6 and all("dry run: error: " in j for j in jobs)
    # five stat_paper jobs reject the value; the dense job's pruner (none) has no such key at all
    assert sum("pruner.procedure='nope'; allowed: auto, bert, opt" in j for j in jobs) == 5
    assert "Traceback" not in proc.stderr


def test_expand_takes_the_union_of_grids_and_runs_identical_jobs_once():
    parser = OverridesParser.create()

    def product(base):
        return BasicSweeper.split_arguments(base, None)[0]

    grids = {"a": [{"x": "1,2", "y": "0"}, {"x": "1", "y": "0"}], "b": [{"z": "5"}]}
    jobs = expand(parser.parse_overrides(["experiment=a,b", "y=9,8"]), parser.parse_overrides, product, [],
                  lambda name: grids[name])
    assert [sorted(j) for j in jobs] == [
        ["experiment=a", "x=1", "y=9"], ["experiment=a", "x=1", "y=8"], ["experiment=a", "x=2", "y=9"],
        ["experiment=a", "x=2", "y=8"], ["experiment=b", "y=9", "z=5"], ["experiment=b", "y=8", "z=5"]]
    assert grids_of({"grids": {"keep": {"x": "1"}, "dropped": None}, "params": {"q": "2"}}) == [{"x": "1"}]
    assert grids_of({"params": {"q": "2"}}) == [{"q": "2"}] and grids_of(None) == []


RESULTS = {"bert_base_mnli": {"metric": "glue/accuracy_matched", "dense": 0.8453, "kwon": {0.5: 0.8086}}}


def test_published_value_by_model_pruner_and_budget():
    assert published_value(RESULTS, "bert_base_mnli", "kwon", 0.5) == ("glue/accuracy_matched", 0.8086)
    assert published_value(RESULTS, "bert_base_mnli", "stat_paper", 1.0) == ("glue/accuracy_matched", 0.8453)
    assert published_value(RESULTS, "bert_base_mnli", "stat_paper", 0.5) is None
    assert published_value(RESULTS, "bert_base_qqp", "kwon", 0.5) is None


def test_sweep_report_puts_published_beside_measured(tmp_path):
    for num, (pruner, flops, acc) in enumerate([("kwon", 0.5, 0.79), ("none", 1.0, 0.84), ("stat_paper", 0.5, 0.81)]):
        job = tmp_path / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"published": {"results": RESULTS}}))
        (job / "results.json").write_text(json.dumps({
            "status": "ok", "error": None, "model": "bert_base_mnli", "pruner": pruner, "variant": None,
            "target": {"flops_fraction": flops}, "achieved": {"flops_fraction": flops, "params_fraction": flops},
            "metrics": {"glue/accuracy_matched": acc, "glue/score": acc}, "timing_s": {"total": 1.0}}))
    rows = {r["pruner"]: r for r in _read_csv(write_report(tmp_path)["csv"])}
    assert rows["kwon"]["published"] == "0.8086" and rows["kwon"]["measured"] == "0.79"
    assert rows["none"]["published"] == "0.8453" and rows["none"]["published_metric"] == "glue/accuracy_matched"
    assert rows["stat_paper"]["published"] == ""  # nothing published for it
    header = next(line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| pruner"))
    assert header.index("measured") < header.index("published |")


def _read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))
