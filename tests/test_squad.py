"""SQuAD: the official metric on hand-made answers, the answer spans and the post-processing, the
file format check, and a whole job on a tiny local SQuAD file with a tiny random QA model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

from stat_exp.assets import model_path
from stat_exp.data.squad import SquadCalibration, SquadExample, encode, read_squad_json
from stat_exp.data.text import DataError
from stat_exp.eval.squad import SquadEval, best_answer
from stat_exp.eval.squad_metric import squad_scores
from stat_exp.factorize import GramBackend
from stat_exp.models import get_adapter
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.kwon import KwonPruner
from stat_exp.prune.runner import PruneRunner
from tests.test_cli import ENV

CPU = torch.device("cpu")


def test_metric_v11_matches_the_official_script_by_hand():
    answers = {"q1": ["cat sat"], "q2": ["the dog"], "q3": ["Paris", "France Paris"], "q4": ["x"], "q5": ["the"]}
    preds = {"q1": "The Cat sat!", "q2": "a big dog", "q3": "Paris France", "q5": "The"}  # q4: no prediction
    # q1: equal after normalisation (1, 1). q2: "big dog" vs "dog": P 1/2, R 1 -> F1 2/3, EM 0.
    # q3: best gold "france paris": all tokens shared -> F1 1, EM 0. q4: missing -> 0.
    # q5: "the" normalises to "" on both sides: EM 1, and v1.1's F1 of no tokens is 0.
    scores = squad_scores(preds, answers, "1.1")
    assert scores == pytest.approx({"exact_match": 100 * 2 / 5, "f1": 100 * (1 + 2 / 3 + 1 + 0 + 0) / 5})


def test_metric_v20_matches_the_official_script_by_hand():
    answers = {"u1": [], "u2": [], "a1": ["Rome"], "a2": ["the", "Rome"], "a3": ["big red dog"], "a4": ["the"]}
    preds = {"u1": "", "u2": "something", "a1": "", "a2": "rome", "a3": "red dog", "a4": "The"}
    # u1: gold [""], pred "" -> 1, 1. u2: gold [""] -> 0, 0. a1: empty prediction -> 0, 0.
    # a2: gold "the" is dropped (normalises to nothing), "rome" -> 1, 1. a3: P 1, R 2/3 -> F1 0.8, EM 0.
    # a4: the only gold normalises to nothing -> gold [""]; "The" -> "" -> 1, and F1 1 (both empty).
    scores = squad_scores(preds, answers, "2.0")
    assert scores == pytest.approx({
        "exact_match": 100 * 3 / 6, "f1": 100 * (1 + 0 + 0 + 1 + 0.8 + 1) / 6,
        "has_answer_exact_match": 100 * 2 / 4, "has_answer_f1": 100 * (0 + 1 + 0.8 + 1) / 4,
        "no_answer_exact_match": 50.0, "no_answer_f1": 50.0})


def test_post_processing_picks_the_best_span_inside_the_context():
    example = SquadExample("q", "who?", "Ada wrote code", ("Ada",), (0,))
    offsets = [None, None, (0, 3), (4, 9), (10, 14), None]  # [CLS] who? | Ada wrote code | [SEP]
    start = np.array([0.0, 9.0, 2.0, 1.0, 0.5, 0.0])  # the question token scores highest: not in the context
    end = np.array([0.0, 9.0, 3.0, 0.2, 2.9, 0.0])
    assert best_answer(example, [(start, end, offsets)], 20, 30, "1.1", 0.0) == "Ada"
    assert best_answer(example, [(start, end, offsets)], 20, 1, "1.1", 0.0) == "Ada"  # length 1 token
    start[0], end[0] = 4.0, 4.0  # no-answer score 8 > best span 5
    assert best_answer(example, [(start, end, offsets)], 20, 30, "2.0", 0.0) == ""
    assert best_answer(example, [(start, end, offsets)], 20, 30, "2.0", 5.0) == "Ada"
    assert best_answer(example, [(start, end, offsets)], 20, 30, "1.1", 0.0) == "Ada"


CONTEXTS = [
    ("Marie Curie was a physicist and chemist who conducted research on radioactivity. She was born in Warsaw.",
     [("Where was Marie Curie born?", "Warsaw"), ("What did Curie research?", "radioactivity")]),
    ("The Nile is a major river in northeastern Africa. It flows into the Mediterranean Sea.",
     [("Where does the Nile flow into?", "the Mediterranean Sea"), ("Which continent is the Nile in?", "Africa")]),
    ("Python was created by Guido van Rossum and first released in 1991 as a successor to ABC.",
     [("Who created Python?", "Guido van Rossum"), ("When was Python first released?", "1991")]),
]


def squad_file(path: Path) -> Path:
    data = {"version": "1.1", "data": [{"title": f"t{i}", "paragraphs": [{"context": context, "qas": [
        {"id": f"{i}-{j}", "question": q, "answers": [{"text": a, "answer_start": context.index(a)}]}
        for j, (q, a) in enumerate(qas)]}]} for i, (context, qas) in enumerate(CONTEXTS)]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(model_path("minilm_l6"))


def test_training_spans_point_at_the_answer_in_every_window(tmp_path, tokenizer):
    examples = read_squad_json(squad_file(tmp_path / "s.json"))
    features = encode(tokenizer, examples, max_length=24, doc_stride=8, batch_size=64, labels=True)
    batch = features.batches[0]
    labels = batch["labels"]
    found = 0
    for row, (i, start, end) in enumerate(zip(features.example, labels["start_positions"], labels["end_positions"])):
        text = tokenizer.decode(batch["input_ids"][row, start:end + 1])
        if start == 0:  # [CLS]: this window does not hold the answer
            assert end == 0
        else:
            found += 1
            assert text.replace(" ", "") == examples[i].answers[0].lower().replace(" ", "")
    assert found >= len(examples) and len(features.example) > len(examples)  # long contexts made several windows


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", 'no top-level "data" list'),
    ('{"data": [{"title": "x"}]}', 'data[0] has no "paragraphs" list'),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q"}]}]}]}',
     'data[0].paragraphs[0].qas[0] needs "id", "question" and an "answers" list'),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q", "answers": [{"text": "c"}]}]}]}]}',
     'integer "answer_start"'),
    ("{not json", "not JSON"),
])
def test_a_file_in_the_wrong_format_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match="SQuAD format|not JSON") as err:
        read_squad_json(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def tiny_qa(folder: Path, tokenizer) -> Path:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertForQuestionAnswering(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_bad_options_are_config_errors(tmp_path):
    from stat_exp.errors import ConfigError

    data = str(squad_file(tmp_path / "s.json"))
    with pytest.raises(ConfigError, match="eval.squad.version='3'; allowed: 1.1, 2.0"):
        SquadEval(version="3", data_file=data)
    from stat_exp.config.signature import check_node

    with pytest.raises(ConfigError, match="calib.num_examples"):
        check_node("calib", {"_target_": "stat_exp.data.squad.SquadCalibration", "data_file": data, "num_examples": 0})
    with pytest.raises(ConfigError, match="eval.squad.max_examples"):
        check_node("eval.squad", {"_target_": "stat_exp.eval.squad.SquadEval", "data_file": data, "max_examples": 0})
    check_node("eval.squad", {"_target_": "stat_exp.eval.squad.SquadEval", "data_file": data, "doc_stride": 0})


def test_kwon_takes_its_fisher_information_from_the_qa_loss(tmp_path, tokenizer):
    data = squad_file(tmp_path / "s.json")
    model = BertForQuestionAnswering.from_pretrained(tiny_qa(tmp_path / "qa", tokenizer)).eval()
    batches = SquadCalibration(data_file=str(data), num_examples=512, max_length=64, doc_stride=16, batch_size=4).batches(tokenizer)
    out = PruneRunner(KwonPruner(), BudgetSpec(0.6, 64), GramBackend(), progress=False).run(model, get_adapter(model), batches, CPU)
    assert out.achieved["flops_fraction"] == pytest.approx(0.6, abs=0.02)
    scores = SquadEval(data_file=str(data), max_length=64, doc_stride=16, progress=False)(model, tokenizer, CPU)
    assert set(scores) == {"squad/exact_match", "squad/f1"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stat_exp.run", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("pruner", [["pruner=stat_paper"], ["pruner=kwon", "pruner.fisher_examples=4"]])
def test_a_squad_job_runs_end_to_end_on_a_local_file(tmp_path, tokenizer, pruner):
    """Kwon et al. draws its own examples from the calibration source (`batches(num_examples=...)`),
    on SQuAD as on every source."""
    data, model = squad_file(tmp_path / "squad.json"), tiny_qa(tmp_path / "qa", tokenizer)
    run_dir = tmp_path / "run"
    proc = _run(["model=bert_base_squad", f"model.source={model}", "model.name=tiny_qa", *pruner,
                 "budget.flops=0.7", "budget.seq_len=64", "eval=squad", f"eval.squad.data_file={data}",
                 "eval.squad.max_length=64", "eval.squad.doc_stride=16",
                 "calib=squad", f"calib.data_file={data}", "calib.max_length=64", "calib.doc_stride=16",
                 "logger=none", "progress=false", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok" and results["pruner"] == pruner[0].removeprefix("pruner=")
    assert results["achieved"]["flops_fraction"] < 0.75
    assert 0 <= results["metrics"]["squad/f1"] <= 100 and "squad/exact_match" in results["metrics"]


@pytest.mark.parametrize("args,message", [
    (["model.task=qa"], "model.task='qa'; allowed: causal_lm, encoder, sequence_classification, question_answering"),
    (["eval.squad.data_file={bad}"], "not in the SQuAD format"),
])
def test_bad_squad_input_exits_2_with_one_line(tmp_path, tokenizer, args, message):
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [{"title": "no paragraphs"}]}')
    model = tiny_qa(tmp_path / "qa", tokenizer)
    proc = _run(["model=bert_base_squad", f"model.source={model}", "pruner=none", "eval=squad",
                 f"eval.squad.data_file={squad_file(tmp_path / 's.json')}", "logger=none",
                 f"hydra.run.dir={tmp_path / 'run'}", *[a.format(bad=bad) for a in args]], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
