"""The command line: every config passes its own schema and builds, every bad value is one line with
exit code 2 before weights load, plug-ins from outside the package work, and the documented command
runs end to end on the embedded SmolLM2."""
from __future__ import annotations

import functools
import json
import re
import typing
from pathlib import Path

import pytest
import torch
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from stat_exp.config.cli import check_overrides, compose_config, group_options
from stat_exp.config.signature import check_node, closed_choices, signature_of
from stat_exp.config.validate import SCHEMAS, SUPPLIED, checked_config
from stat_exp.data.text import load_text
from stat_exp.errors import ConfigError, UserError
from stat_exp.eval.perplexity import perplexity
from stat_exp.export import load_pruned
from stat_exp.track.results import validate_results
from tests.jobs import ENV, REPO, run_cli
from tests.tiny import save_tiny_causal_lm

GROUPS = ["model", "calib", "pruner", "budget", "factorization", "eval", "logger"]
# options that only make sense together with others (a GLUE calibration needs a GLUE task)
COMPANIONS = {("calib", "glue"): ["eval=glue", "eval.glue.task=sst2"], ("eval", "glue"): ["eval.glue.task=sst2"]}
# wandb starts a W&B run (built in test_track); squad reads its data when built (from the hub by
# default; built on a local file in test_squad)
NOT_BUILT = {"logger": {"wandb"}, "eval": {"squad"}}
RUNTIME = {"factorization": {"device": "cpu"}, "logger": {"run_dir": "unused", "run_config": {}}}


@functools.cache
def _checked(group: str, option: str) -> dict:
    """The default config with one option chosen, checked against every schema and completed."""
    return checked_config(compose_config([f"{group}={option}", *COMPANIONS.get((group, option), [])]))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_config_passes_its_schema_and_builds(group, option, tmp_path):
    plain = _checked(group, option)
    nodes = plain[group].items() if group == "eval" else [(group, plain[group])]
    for name, node in nodes:
        if "_target_" in node and option not in NOT_BUILT.get(group, ()):
            runtime = {k: (tmp_path if v == "unused" else v) for k, v in RUNTIME.get(group, {}).items()}
            assert instantiate(node, **runtime, _convert_="all") is not None, name


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_passes_the_schemas(experiment):
    plain = checked_config(compose_config([f"experiment={experiment}"]))
    assert plain["model"]["name"]


def _closed_choices() -> list[tuple[str, dict, object, str, list]]:
    """(key, its config node, schema, parameter, allowed values) of every Literal-typed value of every
    packaged config, so a new closed choice is covered as soon as it exists."""
    found = []
    for group in GROUPS:
        for option in group_options(group):
            plain = _checked(group, option)
            nodes = plain[group].items() if group == "eval" else [(None, plain[group])]
            for name, node in nodes:
                schema = get_object(node["_target_"]) if "_target_" in node else SCHEMAS[group]
                for param, hint in signature_of(schema).hints.items():
                    if closed_choices(hint) and param not in SUPPLIED.get(group, ()):
                        allowed = closed_choices(hint) + (["null"] if type(None) in typing.get_args(hint) else [])
                        found.append((f"{group}.{name}" if name else group, node, schema, param, allowed))
    return found


def test_every_closed_choice_rejects_other_values_naming_the_allowed_ones():
    found = _closed_choices()
    assert {"pruner.gqa", "factorization.kind", "factorization.block_dtype", "calib.propagate", "logger.mode",
            "model.dtype", "budget.allocation", "eval.embedding.benchmarks"} <= {f"{k}.{p}" for k, _, _, p, _ in found}
    for key, node, schema, param, allowed in found:
        sequence = isinstance(node.get(param), list)
        with pytest.raises(ConfigError) as err:
            check_node(key, {**node, param: ["not_allowed"] if sequence else "not_allowed"}, schema)
        shown = f"{key}.{param}[0]" if sequence else f"{key}.{param}"
        assert str(err.value) == f"{shown}='not_allowed'; allowed: {', '.join(map(str, allowed))}"


@pytest.mark.parametrize("overrides,message", [
    (["pruner.gqa=x"], "pruner.gqa='x'; allowed: per_group, whole_groups"),
    (["factorization.block_dtype=float16"], "factorization.block_dtype='float16'; allowed: float32, float64"),
    (["factorization=sketch", "factorization.kind=dense"], "factorization.kind='dense'; allowed: gaussian, countsketch"),
    (["factorization=sketch", "factorization.rows_per_unit=0.5"], "factorization.rows_per_unit=0.5; must be greater than or equal to 1"),
    (["calib.propagate=layerwise"], "calib.propagate='layerwise'; allowed: dense, pruned"),
    (["eval.perplexity.seq_len=1"], "eval.perplexity.seq_len=1; must be greater than or equal to 2"),
    (["eval.perplexity.batch_size=0"], "eval.perplexity.batch_size=0; must be greater than 0"),
    (["eval.perplexity.max_tokens=-5"], "eval.perplexity.max_tokens=-5; must be greater than 0"),
    (["eval.perplexity.max_tokens=many"], "eval.perplexity.max_tokens='many'; must be a valid integer"),
    (["budget.flops=1.5"], "budget.flops=1.5; must be less than or equal to 1"),
    (["budget.round_to=0"], "budget.round_to=0; must be greater than 0"),
    (["calib.num_examples=0"], "calib.num_examples=0; must be greater than 0"),
    (["model.dtype=float8"], "model.dtype='float8'; allowed: float32, float16, bfloat16"),
    (["save_model=maybe"], "save_model='maybe'; must be a valid boolean"),
    (["pruner.corection=false"], "pruner.corection: unknown key for StatPruner; valid: gqa, correction, allocation"),
    (["budget.flop=0.5"], "budget.flop: unknown key for BudgetSpec; valid: flops, seq_len, allocation, round_to"),
    (["logger._target_=nope.Logger"], "logger._target_='nope.Logger' cannot be imported"),
    (["logger.mode=live"], "logger.mode='live'; allowed: offline, online, disabled"),
    (["eval.glue.task=sst2"], "eval.glue is set but 'glue' is not among the evaluators of this run (perplexity)"),
    (["eval.lm_eval.limit=0", "eval=lm_eval"], "eval.lm_eval.limit=0; must be greater than 0"),
])
def test_bad_values_are_named_before_anything_loads(overrides, message):
    with pytest.raises(ConfigError) as err:
        checked_config(compose_config(overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_overrides_of_keys_a_file_leaves_to_the_class_default_work_without_plus():
    plain = checked_config(compose_config(["pruner.correction=false", "factorization=sketch", "factorization.kind=countsketch"]))
    assert plain["pruner"]["correction"] is False and plain["factorization"]["kind"] == "countsketch"
    assert plain["pruner"]["gqa"] == "per_group" and plain["factorization"]["rows_per_unit"] == 1.5  # defaults filled in


def test_unknown_names_are_one_line_listing_the_valid_ones():
    for arg, valid in [("pruner=nope", "magnitude_sp"), ("model=gpt5", "smollm2_135m"), ("eval=bleu", "perplexity"),
                       ("pruner=stat,nope", "stat"), ("logger=mlflow", "csv, none, wandb"),
                       ("hydra/launcher=slurm", "joblib, submitit_local, submitit_slurm")]:
        with pytest.raises(UserError, match=f"unknown .* '(nope|gpt5|bleu|mlflow|slurm)'; valid: .*{valid}"):
            check_overrides([arg])
    check_overrides(["pruner=stat,magnitude_sp", "budget.flops=0.5", "experiment=glob(*)", "eval=[perplexity,lm_eval]"])


def test_unknown_name_checks_see_config_dirs_and_search_paths(tmp_path):
    (tmp_path / "pruner").mkdir()
    (tmp_path / "pruner" / "mine.yaml").write_text("_target_: stat_exp.prune.magnitude.MagnitudePruner\n")
    with pytest.raises(UserError, match="unknown pruner 'mine'"):
        check_overrides(["pruner=mine"])
    check_overrides(["--config-dir", str(tmp_path), "pruner=mine"])
    check_overrides([f"hydra.searchpath=[file://{tmp_path}]", "pruner=stat,mine"])
    assert "mine" in group_options("pruner", ["--config-dir", str(tmp_path)])


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny model whose FFN produces nan: calibration statistics that are not finite."""
    folder = tmp_path_factory.mktemp("nan") / "model"
    save_tiny_causal_lm(folder, tokenizer)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("args,message", [
    (["pruner=nope"], "unknown pruner 'nope'; valid:"),
    (["pruner.gqa=x"], "pruner.gqa='x'; allowed: per_group, whole_groups"),
    (["eval.perplexity.text_file=/no/such/file.txt", "pruner=none"], "/no/such/file.txt"),
    (["pruner=stat", "budget.flops=0.5", "calib.num_examples=2", "calib.seq_len=32"], "calibration activations are not finite"),
])
def test_bad_input_exits_2_with_one_line_and_a_failed_record(tiny_job, nan_model, tmp_path, args, message):
    run_dir = tmp_path / "run"
    proc = run_cli(tiny_job.args(f"hydra.run.dir={run_dir}", *args, **{"model.source": nan_model}), tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(_errors(proc)) == 1 and message in _errors(proc)[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    results = run_dir / "results.json"
    if results.exists():  # a failed run never leaves status ok behind; its log keeps the traceback
        assert json.loads(results.read_text())["status"] == "failed"
        assert "Traceback" in (run_dir / "run.log").read_text()


def _readme_files() -> dict[str, str]:
    """The code blocks of the README that start with `# file: <path>`."""
    blocks = re.findall(r"```\w*\n# file: (\S+)\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return dict(blocks)


def test_readme_plugin_pruner_runs_from_outside_the_package(tiny_job, tmp_path):
    files = _readme_files()
    assert {"my_pruners.py", "my_conf/pruner/norm.yaml"} <= set(files)
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    env = {**ENV, "PYTHONPATH": f"{tmp_path}:{ENV['PYTHONPATH']}"}
    run_dir = tmp_path / "run"
    proc = run_cli(["--config-dir", "my_conf", *tiny_job.args(f"hydra.run.dir={run_dir}", "pruner.p=2", pruner="norm")],
                   tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "ok" and record["pruner"] == "norm"
    assert record["achieved"]["flops_fraction"] == pytest.approx(0.8, abs=0.05)
    proc = run_cli(["--config-dir", "my_conf", *tiny_job.args("pruner.p=3", pruner="norm")], tmp_path, env=env)
    assert proc.returncode == 2 and _errors(proc) == ["error: pruner.p=3; allowed: 1, 2"]


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(load_text("wiki_eval")[:40_000])
    return path


@pytest.mark.e2e
def test_documented_command_runs_and_saves_a_reloadable_model(tmp_path, eval_text):
    run_dir = tmp_path / "run"
    proc = run_cli(["model=smollm2_135m", "pruner=magnitude_sp", "budget.flops=0.7", "calib.num_examples=8",
                    "calib.seq_len=128", "eval=perplexity", f"eval.perplexity.text_file={eval_text}",
                    "eval.perplexity.seq_len=256", "eval.perplexity.max_tokens=1024", "logger=none", "save_model=true",
                    f"hydra.run.dir={run_dir}"], tmp_path)
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
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").pruner._target_.endswith("MagnitudePruner")
