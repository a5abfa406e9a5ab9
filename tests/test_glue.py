"""GLUE: metrics against hand computations, local task files, calibration batches, label maps, and a
tiny random BERT classifier end to end through the pipeline on a local GLUE-format task."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from stat_exp.config.cli import compose_config
from stat_exp.config.signature import check_node
from stat_exp.data.glue import GlueCalibration, load_split
from stat_exp.data.text import DataError
from stat_exp.errors import ConfigError
from stat_exp.eval.glue import GlueEval, accuracy, f1, matthews, pearson, spearman
from stat_exp.models import get_adapter
from stat_exp.pipeline import run_pipeline

SENTENCES = ["a gripping , funny and moving film .", "dull .", "the best movie of the year , by far .",
             "an utterly pointless exercise in tedium that never ends .", "warm and wise .", "it is a mess ."]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def sst2_dir(tmp_path) -> Path:
    """A GLUE-format single-sentence task: 24 training and 12 validation sentences."""
    folder = tmp_path / "sst2"
    folder.mkdir()
    rows = [{"sentence": s, "label": i % 2, "idx": i} for i, s in enumerate(SENTENCES * 6)]
    write_jsonl(folder / "train.jsonl", rows[:24])
    write_jsonl(folder / "validation.jsonl", rows[24:])
    return folder


def test_metrics_match_hand_computation():
    pred, label = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # TP 2, TN 1, FP 1, FN 1
    assert accuracy(pred, label) == pytest.approx(3 / 5)
    assert f1(pred, label) == pytest.approx(2 / 3)  # precision = recall = 2/3
    assert matthews(pred, label) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(5 * 26))
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))


def test_local_files_jsonl_and_tsv_with_label_names(tmp_path):
    (tmp_path / "train.tsv").write_text("premise\thypothesis\tlabel\nA man sleeps.\tSomeone rests.\tentailment\n"
                                        "It rains.\tIt is \"dry\".\t2\n", encoding="utf-8")
    rows = load_split("mnli", "train", tmp_path)
    assert rows == [{"premise": "A man sleeps.", "hypothesis": "Someone rests.", "label": 0},
                    {"premise": "It rains.", "hypothesis": 'It is "dry".', "label": 2}]
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "fine .", "label": 1}])  # "text" names the sentence too
    assert load_split("sst2", "validation", tmp_path) == [{"sentence": "fine .", "label": 1}]


def test_bad_data_gives_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown GLUE task 'nope'"):
        load_split("nope", "train", tmp_path)
    with pytest.raises(DataError, match="no validation_matched.jsonl or validation_matched.tsv"):
        load_split("mnli", "validation_matched", tmp_path)
    write_jsonl(tmp_path / "train.jsonl", [{"sentence": "x", "label": -1}])
    with pytest.raises(DataError, match="outside 0..1"):
        load_split("sst2", "train", tmp_path)
    with pytest.raises(DataError, match="offline"):
        load_split("rte", "validation")  # the hub, with HF_DATASETS_OFFLINE=1 and no local cache


def test_pang_lee_split_is_fixed_balanced_and_disjoint():
    train, held_out = load_split("pang_lee", "train"), load_split("pang_lee", "validation")
    assert (len(train), len(held_out)) == (150, 50)
    assert sum(r["label"] for r in held_out) == 25
    assert not {r["sentence"] for r in train} & {r["sentence"] for r in held_out}
    assert load_split("pang_lee", "validation") == held_out


def test_calibration_batches_are_padded_samples_of_the_training_split(sst2_dir, tokenizer):
    calib = GlueCalibration("sst2", str(sst2_dir), num_examples=10, max_length=16, batch_size=4)
    batches = calib.batches(tokenizer)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    assert set(batches[0]) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.dtype == torch.long and set(labels.tolist()) <= {0, 1} and len(labels) == 10
    assert any((b["attention_mask"] == 0).any() for b in batches)  # padded to each batch's longest
    assert all(b["input_ids"].shape[1] <= 16 for b in batches)
    again = calib.batches(tokenizer)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    with pytest.raises(ConfigError, match="calib.num_examples=0; must be greater than 0"):
        check_node("calib", {"_target_": "stat_exp.data.glue.GlueCalibration", "task": "sst2", "num_examples": 0})


def test_calibration_with_replacement_draws_as_the_released_scripts(sst2_dir, tokenizer):
    """prune_bert.py: np.random.seed(seed); Subset(train, np.random.choice(len(train), n)): duplicates
    kept, in the order drawn (the same numbers the global numpy generator gives after seeding)."""
    calib = GlueCalibration("sst2", str(sst2_dir), num_examples=20, max_length=16, batch_size=64,
                            seed=3, with_replacement=True)
    np.random.seed(3)
    released = np.random.choice(24, 20).tolist()
    assert len(set(released)) < 20  # with replacement: some drawn twice
    train = [json.loads(line) for line in (sst2_dir / "train.jsonl").read_text().splitlines()]
    expected = tokenizer([train[i]["sentence"] for i in released], padding=True, truncation=True, max_length=16,
                         return_tensors="pt")
    (batch,) = calib.batches(tokenizer)
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert batch["labels"].tolist() == [train[i]["label"] for i in released]


class ConstantClassifier(torch.nn.Module):
    """Always predicts output index 0."""

    def forward(self, input_ids, **_):
        logits = torch.zeros(input_ids.shape[0], 3)
        logits[:, 0] = 1
        return SimpleNamespace(logits=logits)


def test_label_map_translates_model_outputs(tmp_path, tokenizer):
    rows = [{"premise": "p", "hypothesis": "h", "label": label} for label in (0, 1, 2, 2)]
    write_jsonl(tmp_path / "validation_matched.jsonl", rows)
    write_jsonl(tmp_path / "validation_mismatched.jsonl", rows[:2])
    plain = GlueEval("mnli", str(tmp_path), progress=False)(ConstantClassifier(), tokenizer, torch.device("cpu"))
    assert plain == {"glue/accuracy_matched": 0.25, "glue/accuracy_mismatched": 0.5, "glue/score": 0.25}
    mapped = GlueEval("mnli", str(tmp_path), label_map=[1, 2, 0], progress=False)  # output 0 = contradiction (2)
    assert mapped(ConstantClassifier(), tokenizer, torch.device("cpu"))["glue/accuracy_matched"] == 0.5
    with pytest.raises(ConfigError, match="permutation"):
        GlueEval("mnli", label_map=[0, 0, 1])


def local_task_config(tmp_path: Path, sst2_dir: Path, tokenizer, *overrides: str):
    """The config of a job on a tiny random BERT classifier saved to disk, with the local sst2 task."""
    folder = tmp_path / "tiny-bert-sst2"
    BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    common = [f"model.source={folder}", "model.glue_task=sst2", f"eval.glue.data_dir={sst2_dir}", "budget.flops=0.6",
              "budget.seq_len=16", "logger=none", "device=cpu", "progress=false"]
    return compose_config(["model=minilm_l6_polarity", "eval=glue", "calib=glue", *common, *overrides])


def test_the_plan_counts_no_more_examples_than_the_training_split_holds(tmp_path, sst2_dir, tokenizer):
    from stat_exp.execution.plan import make_plan
    from stat_exp.pipeline import build_parts

    assert GlueCalibration("sst2", str(sst2_dir)).available_examples == 24
    assert GlueCalibration("sst2", str(sst2_dir), with_replacement=True).available_examples is None
    cpu = torch.device("cpu")
    for count, planned in ((100_000, 24), (10, 10), ("auto", 24)):  # every example, a subset, the knee's 171
        cfg = local_task_config(tmp_path, sst2_dir, tokenizer, "pruner=stat", f"calib.num_examples={count}",
                                "calib.max_length=16")
        size = make_plan(cfg, build_parts(cfg, cpu, None), cpu).calibration
        assert size.num_examples == planned
    assert size.capped_by == "data" and "every example the calibration source holds" in size.warning()


@pytest.mark.parametrize("pruner", ["stat", "kwon"])  # kwon: Fisher information from the task loss
def test_pipeline_end_to_end_on_a_local_task(tmp_path, sst2_dir, tokenizer, pruner):
    cfg = local_task_config(tmp_path, sst2_dir, tokenizer, "calib.num_examples=24", f"pruner={pruner}")
    record = run_pipeline(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record.status == saved["status"] == "ok"
    assert saved["achieved"]["flops_fraction"] == pytest.approx(0.6, abs=0.02)
    assert set(saved["metrics"]) == {"glue/accuracy", "glue/score"}
    assert 0 <= saved["metrics"]["glue/accuracy"] <= 1


def test_kwon_on_an_encoder_without_labels_says_what_it_needs(tmp_path):
    from stat_exp.prune.kwon import KwonPruner
    from tests.test_encoders import MODELS, examples, padded

    model = MODELS["bert_cls"]().eval()
    with pytest.raises(ConfigError, match="calibrated on labelled data"):
        KwonPruner().prepare(model, get_adapter(model), padded(examples(8), 4, None))
