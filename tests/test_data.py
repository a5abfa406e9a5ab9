"""Text loading and calibration batches (tiny real tokenizer: the MiniLM WordPiece one)."""

import json

import pytest
import torch

from stat_exp.assets import corpus_path
from stat_exp.data import DataError, calibration_batches, encode, load_text
from stat_exp.data.text import parse_hub_source
from tests.jobs import ENV, run_cli


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """A .jsonl of 200 real sentences (~6k tokens), copied from the embedded pang_lee corpus."""
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    path.write_text(corpus_path("pang_lee").read_text(encoding="utf-8"), encoding="utf-8")
    return path


def test_jsonl_joins_text_fields(reviews):
    rows = [json.loads(line) for line in reviews.read_text(encoding="utf-8").splitlines()]
    assert load_text(str(reviews)) == "\n\n".join(r["text"] for r in rows)


def test_txt_and_embedded_names(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo\n\nworld\n", encoding="utf-8")
    assert load_text(str(path)) == "héllo\n\nworld\n"
    assert load_text("crime") == corpus_path("crime").read_text(encoding="utf-8")


def test_batches_shapes_and_masks(tokenizer, reviews):
    batches = calibration_batches(tokenizer, str(reviews), num_examples=10, seq_len=32, seed=0, batch_size=4)
    assert [b["input_ids"].shape for b in batches] == [(4, 32), (4, 32), (2, 32)]
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask"}
        assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long
        assert torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"]))


def test_windows_are_contiguous_slices_of_the_stream(tokenizer, reviews):
    ids = encode(tokenizer, load_text(str(reviews)))
    assert tokenizer.cls_token_id not in ids.tolist()  # no special tokens
    windows = torch.cat([b["input_ids"] for b in calibration_batches(tokenizer, str(reviews), 5, 16, 3, 5)])
    for window in windows:
        starts = (ids[: ids.numel() - 15] == window[0]).nonzero().flatten()
        assert any(torch.equal(ids[s : s + 16], window) for s in starts.tolist())


def test_determinism_and_seed(tokenizer, reviews):
    def draw(seed):
        return torch.cat([b["input_ids"] for b in calibration_batches(tokenizer, str(reviews), 6, 24, seed, 4)])

    first, second, other = draw(7), draw(7), draw(8)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_batch_size_does_not_change_windows(tokenizer, reviews):
    one = torch.cat([b["input_ids"] for b in calibration_batches(tokenizer, str(reviews), 6, 24, 1, 1)])
    six = calibration_batches(tokenizer, str(reviews), 6, 24, 1, 6)
    assert len(six) == 1 and torch.equal(one, six[0]["input_ids"])


def test_missing_file(tokenizer, tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="data file not found: .*nope.txt"):
        calibration_batches(tokenizer, str(missing), 4, 8, 0, 2)


@pytest.mark.parametrize("name, content", [("empty.txt", ""), ("blank.txt", " \n\n "), ("empty.jsonl", "\n")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=f"data file is empty: .*{name}"):
        load_text(str(path))


def test_bad_jsonl_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"label": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*'text'"):
        load_text(str(path))


def test_too_short_text(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("just a few words here")
    n = len(encode(tokenizer, path.read_text()))
    with pytest.raises(DataError, match=f"only {n} tokens; seq_len=64 needs at least 65"):
        calibration_batches(tokenizer, str(path), 4, 64, 0, 2)
    with pytest.raises(DataError, match="num_examples must be a positive integer"):
        calibration_batches(tokenizer, str(path), 0, 2, 0, 2)


def test_hub_source_offline_is_one_line():
    with pytest.raises(DataError) as err:
        load_text("hf:wikitext/wikitext-2-raw-v1/test")
    message = str(err.value)
    assert "\n" not in message and "wikitext" in message and "offline" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_parse_hub_source():
    assert parse_hub_source("wikitext/wikitext-2-raw-v1/test") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert parse_hub_source("Salesforce/wikitext/wikitext-2-raw-v1/test") == (
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        "test",
    )
    assert parse_hub_source("owner/name//train") == ("owner/name", None, "train")
    assert parse_hub_source("ptb_text_only/test") == ("ptb_text_only", None, "test")
    with pytest.raises(DataError, match="bad hub source"):
        parse_hub_source("wikitext")


def test_hub_source_with_one_data_file(monkeypatch):
    """`?data_files=`: one file of the dataset repo as the split (how C4 is read for calibration)."""
    import datasets

    calls = []

    class Split:
        column_names = ["text"]

        def __getitem__(self, key):
            return ["a document", "another"]

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or Split())
    text = load_text("hf:allenai/c4//train?data_files=en/c4-train.00000-of-01024.json.gz")
    assert calls == [(("allenai/c4", None), {"split": "train", "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}})]
    assert text == "a document\n\nanother"
    load_text("hf:Salesforce/wikitext/wikitext-2-raw-v1/test")
    assert calls[-1] == (("Salesforce/wikitext", "wikitext-2-raw-v1"), {"split": "test"})


USER_CALIBRATION = '''
import torch

from stat_exp.data.base import Calibration


class RandomTokens(Calibration):
    """A user's own source: uniformly random token ids (a stand-in for any data of theirs)."""

    def __init__(self, num_examples: int = 4, seq_len: int = 16, batch_size: int = 2, seed: int = 0):
        self.num_examples, self.seq_len, self.batch_size, self.seed = num_examples, seq_len, batch_size, seed

    @property
    def longest_sequence(self) -> int:
        return self.seq_len

    def batches(self, tokenizer, num_examples=None):
        n = num_examples or self.num_examples
        g = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(3, len(tokenizer), (n, self.seq_len), generator=g)
        print(f"RandomTokens drew {n} examples", flush=True)
        return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(self.batch_size)]
'''


@pytest.mark.parametrize("pruner", [["pruner=wanda_sp"], ["pruner=kwon", "pruner.fisher_examples=3"]])
def test_a_users_own_calibration_source_runs_a_whole_job(tiny_job, tmp_path, pruner):
    """A Calibration subclass outside the package, chosen with `calib=<its config>`: the layer stream
    takes its batches, and a pruner that draws its own examples (kwon) asks it for a count."""
    (tmp_path / "my_calibration.py").write_text(USER_CALIBRATION)
    (tmp_path / "my_conf" / "calib").mkdir(parents=True)
    (tmp_path / "my_conf" / "calib" / "tokens.yaml").write_text("_target_: my_calibration.RandomTokens\nseq_len: 16\n")
    run_dir = tmp_path / "run"
    args = [a for a in tiny_job.args(f"hydra.run.dir={run_dir}") if not a.startswith(("calib.", "pruner="))]
    proc = run_cli(["--config-dir", "my_conf", *args, *pruner, "calib=tokens"], tmp_path,
                   env={**ENV, "PYTHONPATH": f"{tmp_path}:{ENV['PYTHONPATH']}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "ok" and record["achieved"]["flops_fraction"] < 0.9
    drawn = [line for line in proc.stdout.splitlines() if line.startswith("RandomTokens drew")]
    assert drawn[0] == "RandomTokens drew 4 examples"
    assert ("RandomTokens drew 3 examples" in drawn) == ("pruner=kwon" in pruner)
