"""The lm_eval bridge: in-memory evaluation, the offline tasks on the real SmolLM2, agreement with our
perplexity on a pruned model, one-line errors offline, and the paper experiment's config."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from stat_exp.assets import corpus_path, model_path
from stat_exp.config.signature import check_node
from stat_exp.data.text import encode
from stat_exp.errors import ConfigError, UserError
from stat_exp.eval.lm_eval_bridge import TABLE_FILE, LMEvalEval, metrics_of
from stat_exp.eval.perplexity import make_chunks, perplexity
from stat_exp.eval.tasks import TASK_NAMES, analogy_questions, prepare_tasks
from stat_exp.models import get_adapter
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.magnitude import MagnitudePruner
from stat_exp.prune.runner import PruneRunner

CPU = torch.device("cpu")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "stat_exp" / "conf")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path("smollm2_135m"))


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path("smollm2_135m")).eval()


def _finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


def test_bridge_in_memory_with_table(tiny, tokenizer, tmp_path):
    evaluator = LMEvalEval(["stat_pang_lee", "stat_lastword"], batch_size=4, limit=4, output_dir=tmp_path)
    metrics = evaluator(tiny, tokenizer, CPU)
    expected = {f"lm_eval/stat_pang_lee/{m}" for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
    expected |= {f"lm_eval/stat_lastword/{m}" for m in ("acc", "acc_stderr", "perplexity", "perplexity_stderr")}
    assert set(metrics) == expected
    assert _finite(metrics) and 0 <= metrics["lm_eval/stat_pang_lee/acc"] <= 1
    table = (tmp_path / TABLE_FILE).read_text()
    assert "stat_pang_lee" in table and "stat_lastword" in table and "|acc" in table


# Documents per task for the real model: few, so that the four tasks score in one short call
# (about 2,300 tokens). SmolLM2 gets 0.81 / 0.83 here (0.77 / 0.80 on 200 documents).
SAMPLES = {"stat_pang_lee": range(16), "stat_analogies": range(12), "stat_lastword": range(8),
           "stat_wiki_ppl": [6]}  # the shortest article (348 tokens)


@pytest.mark.e2e
def test_embedded_tasks_on_smollm2(smollm2, tokenizer):
    samples = {task: list(docs) for task, docs in SAMPLES.items()}
    metrics = LMEvalEval(list(samples), batch_size=8, samples=samples, bootstrap_iters=0)(smollm2, tokenizer, CPU)
    assert _finite(metrics)
    assert {key.split("/")[1] for key in metrics} == set(TASK_NAMES)
    for task in ("stat_pang_lee", "stat_analogies", "stat_lastword"):
        assert 0 <= metrics[f"lm_eval/{task}/acc"] <= 1
    assert metrics["lm_eval/stat_pang_lee/acc"] >= 0.6  # chance 0.5
    assert metrics["lm_eval/stat_analogies/acc"] >= 0.5  # chance 0.25
    assert 1 < metrics["lm_eval/stat_wiki_ppl/byte_perplexity"] < metrics["lm_eval/stat_wiki_ppl/word_perplexity"]


@pytest.mark.e2e
def test_rolling_loglikelihood_matches_our_perplexity_on_a_pruned_model(smollm2, tokenizer, tmp_path):
    """Same tokens, same contexts: each document is one of our seq_len chunks minus its first token,
    and that first token is HFLM's prefix token (BOS), which our evaluator is given as chunk start."""
    model = copy.deepcopy(smollm2)
    PruneRunner(MagnitudePruner(), BudgetSpec(flops=0.7, seq_len=32), backend=None, progress=False).run(
        model, get_adapter(model), [], CPU)
    prefix = tokenizer.decode([tokenizer.bos_token_id])
    docs = _roundtrip_documents(tokenizer, seq_len=64, count=4)
    ours = perplexity(model, tokenizer, "".join(prefix + d for d in docs), seq_len=64, max_tokens=None,
                      batch_size=4, progress=False)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    task = {"task": "agree_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
            "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity"}]}
    records = LMEvalEval([task], batch_size=4).results(model, tokenizer, CPU, log_samples=True)["samples"]["agree_ppl"]
    loglikelihood = sum(r["filtered_resps"][0] for r in records)
    assert ours["tokens"] == 4 * 63 and len(records) == 4
    assert math.exp(-loglikelihood / ours["tokens"]) == pytest.approx(ours["ppl"], rel=1e-3)


def _roundtrip_documents(tokenizer, seq_len: int, count: int) -> list[str]:
    """Texts of chunk[1:] for wiki chunks whose decoded text encodes back to the same tokens."""
    text = corpus_path("wiki_eval").read_text(encoding="utf-8")[:20000]
    docs = []
    for chunk in make_chunks(encode(tokenizer, text), seq_len, None):
        doc = tokenizer.decode(chunk[1:])
        if encode(tokenizer, doc).tolist() == chunk[1:].tolist():
            docs.append(doc)
    assert len(docs) >= count
    return docs[:count]


def test_standard_task_offline_and_unknown_task_are_one_line(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    # An empty cache: the answer must not depend on what this machine downloaded before.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as offline:
        LMEvalEval(["stat_pang_lee", "piqa"])
    assert str(offline.value) == ("lm_eval task 'piqa' needs the Hugging Face hub, which is offline here; "
                                  f"offline tasks: {', '.join(TASK_NAMES)}")
    with pytest.raises(UserError) as unknown:
        LMEvalEval(["no_such_task"])
    message = str(unknown.value)
    assert "\n" not in message and "no_such_task" in message and "stat_wiki_ppl" in message and "online" in message


def test_bad_options():
    with pytest.raises(ConfigError, match="exclude each other"):
        LMEvalEval(["stat_pang_lee"], limit=4, samples={"stat_pang_lee": [0]})
    target = "stat_exp.eval.lm_eval_bridge.LMEvalEval"
    with pytest.raises(ConfigError, match="eval.lm_eval.tasks=\\[\\]; must be"):
        check_node("eval.lm_eval", {"_target_": target, "tasks": []})
    with pytest.raises(ConfigError, match="eval.lm_eval.limit=0; must be greater than 0"):
        check_node("eval.lm_eval", {"_target_": target, "tasks": ["stat_pang_lee"], "limit": 0})


def test_prepared_tasks_use_absolute_data_paths():
    folder = prepare_tasks(TASK_NAMES)
    for name in TASK_NAMES:
        text = (folder / f"{name}.yaml").read_text()
        data = Path(text.split("test: ", 1)[1].splitlines()[0])
        assert data.is_absolute() and data.is_file() and data.stat().st_size > 0


def test_analogy_cloze_is_deterministic_and_well_formed():
    questions = analogy_questions()
    assert questions == analogy_questions() and len(questions) == 1000
    assert len({q["category"] for q in questions[:100]}) > 5  # shuffled: a limit sees many categories
    for q in questions:
        assert len(set(q["choices"])) == 4 and q["choices"][q["gold"]] == q["d"]
        assert not {q["a"], q["b"], q["c"]} & set(q["choices"])


def test_metrics_of_drops_the_none_filter_and_keeps_others():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                                 "exact_match,strict-match": 0.25, "sample_len": 3}}}
    assert metrics_of(results) == {"lm_eval/t/acc": 0.5, "lm_eval/t/exact_match/strict-match": 0.25}


def test_llama2_7b_paper_experiment_composes():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=llama2_7b_paper"], return_hydra_config=True)
    assert cfg.model.name == "llama2_7b" and cfg.device == "cuda"
    assert cfg.pruner._target_ == "stat_exp.prune.stat_paper.StatPaperPruner"
    assert cfg.calib.source.startswith("hf:") and "wikitext" in cfg.calib.source
    # the standard WikiText-2 protocol: the test split joined with blank lines, 2,048-token windows, all of it
    assert cfg.eval.perplexity.text_file == "hf:Salesforce/wikitext/wikitext-2-raw-v1/test"
    assert cfg.eval.perplexity.seq_len == 2048 and cfg.eval.perplexity.max_tokens is None
    assert cfg.eval.lm_eval._target_ == "stat_exp.eval.lm_eval_bridge.LMEvalEval" and cfg.eval.lm_eval.num_fewshot == 0
    assert list(cfg.eval.lm_eval.tasks) == ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq"]
    grids = cfg.hydra.sweeper.grids
    assert [float(f) for f in grids.pruned["budget.flops"].split(",")] == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert grids.dense == {"budget.flops": 1.0, "pruner": "none"}
