"""Every check that needs no weights runs before they load (stat_exp.preflight), in one line each:
in-process on a saved tiny model and the embedded models' configs (no weights are read)."""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from stat_exp.config.cli import check_overrides, compose_config
from stat_exp.config.validate import checked_config
from stat_exp.errors import UserError
from stat_exp.parts import build_parts
from stat_exp.preflight import preflight

CPU = torch.device("cpu")
NO_PERPLEXITY = {"eval.perplexity.text_file": None, "eval.perplexity.seq_len": None, "eval.perplexity.max_tokens": None}


def _prepare(args: list[str]):
    """(the run's parts, the model's config) after every check before the weights."""
    cfg = OmegaConf.create(checked_config(compose_config(args)))
    parts = build_parts(cfg, CPU, Path(tempfile.gettempdir()))
    return parts, preflight(cfg, parts)


def _fails(args: list[str], message: str) -> str:
    with pytest.raises(UserError) as err:
        _prepare(args)
    text = str(err.value)
    assert message in text and "\n" not in text, text
    return text


def test_a_good_job_prepares_every_part(tiny_job):
    parts, config = _prepare(tiny_job.args(pruner="stat"))
    assert parts.pruner.corrects and set(parts.evaluators) == {"perplexity"}
    assert parts.calibration.tokens == 4 * 32 and config.max_position_embeddings == 2048


def test_a_missing_model_folder_is_named_as_a_folder_not_a_repo_id(tiny_job, tmp_path):
    text = _fails(tiny_job.args(**{"model.source": tmp_path / "nope"}), "no such folder")
    assert "Repo id" not in text


@pytest.mark.parametrize("config,message", [(None, "no config.json"), ("{}", "config.json cannot be read")])
def test_an_empty_model_folder_or_config_fails(tiny_job, tmp_path, config, message):
    folder = tmp_path / "model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    _fails(tiny_job.args(**{"model.source": folder}), message)


@pytest.mark.parametrize("key", ["eval.perplexity.text_file", "calib.source"])
@pytest.mark.parametrize("content,message", [(b"\0" * 5000, "holds NUL bytes"), (b"", "is empty"),
                                             (b"\xff\xfe text", "not UTF-8"), (None, "not found")])
def test_data_files_are_checked_before_the_weights(tiny_job, tmp_path, key, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    _fails(tiny_job.args(pruner="wanda_sp", **{key: path}), message)  # a pruner that calibrates


def test_hub_sources_are_checked_for_syntax(tiny_job):
    _fails(tiny_job.args(pruner="wanda_sp", **{"calib.source": "hf:wikitext"}), "bad hub source 'hf:wikitext'")


def test_calibration_data_is_not_checked_when_nothing_is_pruned(tiny_job, tmp_path):
    _prepare(tiny_job.args(pruner="none", **{"calib.source": tmp_path / "nope.txt"}))


@pytest.mark.parametrize("args,message", [
    (["model.task=encoder"], "eval=perplexity measures a causal_lm model, but model.task=encoder"),
    (["model.task=question_answering"], "is a LlamaForCausalLM checkpoint: its question_answering head would be"),
    (["eval=squad", "model.task=causal_lm"], "eval=squad measures a question_answering model"),
    (["eval=embedding"], "eval=embedding measures an encoder's representations; llama is a decoder"),
])
def test_the_model_must_suit_its_task_and_evaluators(tiny_job, tmp_path, args, message):
    changes = NO_PERPLEXITY if any(a.startswith("eval=") for a in args) else {}
    if "eval=squad" in args:  # a local file, so the evaluator builds offline
        squad = tmp_path / "squad.json"
        squad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [
            {"id": "1", "question": "q", "answers": [{"text": "c", "answer_start": 0}]}]}]}]}))
        args = [*args, f"eval.squad.data_file={squad}"]
    _fails(tiny_job.args(*args, **changes), message)


def test_an_encoder_passes_the_embedding_check():
    _prepare(["model=minilm_l6", "eval=embedding", "pruner=none", "logger=none"])


@pytest.mark.parametrize("key,named", [("eval.perplexity.seq_len", "eval.perplexity"), ("calib.seq_len", "calib"),
                                       ("budget.seq_len", "budget.seq_len")])
def test_lengths_beyond_the_models_positions_fail(tiny_job, key, named):
    _fails(tiny_job.args(pruner="wanda_sp", **{key: 4096}), f"{named} asks for sequences of 4096 tokens; model")


def test_too_few_calibration_tokens_for_the_largest_kept_rank_fail(tiny_job):
    args = tiny_job.args(pruner="stat", **{"calib.num_examples": 1, "calib.seq_len": 8})
    _fails(args, "calibration has 8 tokens")
    _prepare([*args, "budget.allocation=uniform"])  # the bound is the global allocation's
    _prepare(tiny_job.args(pruner="stat_nocorr", **{"calib.num_examples": 1, "calib.seq_len": 8}))  # no correction


@pytest.mark.parametrize("args,message", [
    (["seed=-1"], "seed=-1; must be greater than or equal to 0"),
    ([f"seed={2**32}"], "seed=4294967296; must be less than or equal to 4294967295"),
    (["budget.seq_len=100000000000"], "budget.seq_len=100000000000; must be less than or equal to 16777216"),
])
def test_ranges_have_both_bounds(tiny_job, args, message):
    _fails(tiny_job.args(*args), message)


@pytest.mark.parametrize("argv,message", [
    (["+save_models=true"], "unknown key 'save_models' (+save_models=true); valid top-level keys: budget, calib"),
    (["save_models=true"], "unknown key 'save_models'"),
    (["budget.flops=["], "cannot parse override 'budget.flops=['"),
])
def test_unknown_top_level_keys_and_bad_override_syntax_fail_at_the_command_line(argv, message):
    with pytest.raises(UserError, match=re.escape(message)) as err:
        check_overrides(argv)
    assert "\n" not in str(err.value)


def test_a_calibration_class_must_be_a_calibration(tiny_job):
    args = [a for a in tiny_job.args() if not a.startswith("calib.")]
    _fails([*args, "~calib", "+calib._target_=stat_exp.eval.latency.LatencyEval"], "is not a calibration source")


def test_the_planner_prints_usage_and_ends_every_error_in_one_line(tiny_job, capsys):
    from stat_exp.execution.__main__ import main

    main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m stat_exp.execution")
    for args, message in [(["budget.flops=["], "error: cannot parse override"),
                          (tiny_job.args(**{"eval.perplexity.seq_len": 4096}), "error: eval.perplexity asks for"),
                          (tiny_job.args(**{"model.source": "/no/such/model"}), "no such folder")]:
        with pytest.raises(SystemExit) as end:
            main(args)
        err = capsys.readouterr().err.strip()
        assert end.value.code == 2 and message in err and "\n" not in err, err


def test_the_planners_json_line_is_strict_json(tiny_job, capsys):
    """A throughput so small that the time overflows is null, not Infinity (which JSON does not have)."""
    from stat_exp.execution.__main__ import main

    main(tiny_job.args("execution.tflops=1e-320", pruner="stat"))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    plan = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the planner's JSON line"))
    assert plan["seconds"] is None and plan["peak_host_mb"] > 0


def test_dry_run_runs_every_check(tiny_job, tmp_path):
    from tests.jobs import run_cli

    bad = tmp_path / "nul.txt"
    bad.write_bytes(b"\0" * 100)
    proc = run_cli(tiny_job.args("dry_run=true", f"hydra.run.dir={tmp_path / 'run'}",
                                 **{"eval.perplexity.text_file": bad}), tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: data file is not text: {bad} holds NUL bytes"
    assert not (tmp_path / "run" / "results.json").exists()
