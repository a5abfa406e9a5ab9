"""Plain text for calibration and evaluation: embedded corpora and local files first, hub when asked.

A source string is one of
- an embedded corpus name: ``wiki_calib``, ``wiki_eval``, ``crime`` (see stat_exp.assets);
- a local file: ``.jsonl`` (the "text" field of every row) or anything else read as UTF-8 text;
- ``hf:<dataset>/<config>/<split>`` (e.g. ``hf:wikitext/wikitext-2-raw-v1/test``), loaded with
  datasets.load_dataset, the ``text`` column joined. The dataset name may itself contain a
  slash (``hf:Salesforce/wikitext/wikitext-2-raw-v1/test``); an empty config means none
  (``hf:owner/name//train``), and ``hf:<dataset>/<split>`` means no config either. A suffix
  ``?data_files=<path in the dataset repo>`` reads that file only, as the split (C4 as GPTQ and
  the STAT authors' prune_opt.py read it: ``hf:allenai/c4//train?data_files=en/c4-train.00000-of-01024.json.gz``).
Texts from several records are joined with a blank line ("\\n\\n").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from stat_exp.assets import AssetError, corpus_path
from stat_exp.errors import UserError

TEXT_CORPORA: tuple[str, ...] = ("wiki_calib", "wiki_eval", "crime")
HUB_PREFIX = "hf:"
SEPARATOR = "\n\n"
SNIFF_BYTES = 1 << 20  # what the check before the weights load reads of a text file


class DataError(UserError, ValueError):
    """Calibration or evaluation data that cannot be used (one-line message naming the source)."""


def load_text(source: str) -> str:
    """The whole text of a source (see the module docstring for the accepted forms)."""
    if source.startswith(HUB_PREFIX):
        return _load_hub(source[len(HUB_PREFIX) :])
    if source in TEXT_CORPORA:
        try:
            return _read_file(corpus_path(source))
        except AssetError as err:
            raise DataError(f"embedded corpus '{source}' unavailable: {err}") from None
    return _read_file(_local_file(source))


def check_text_source(source: str) -> None:
    """What `load_text(source)` would reject, found without reading a whole file or the hub: a hub
    source's syntax; a local file that is missing, unreadable, empty, not UTF-8 or has NUL bytes
    (judged on its first SNIFF_BYTES)."""
    if source.startswith(HUB_PREFIX):
        parse_hub_source(source[len(HUB_PREFIX):])
        return
    if source in TEXT_CORPORA:
        return
    path = _local_file(source)
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as err:
        raise DataError(f"data file cannot be read: {path} ({err.strerror})") from None
    try:
        text = _utf8_prefix(head) if len(head) == SNIFF_BYTES else head.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"data file is not UTF-8 text: {path} ({err.reason} at byte {err.start})") from None
    _check_text(text, path)


def _utf8_prefix(head: bytes) -> str:
    """The text of a file's first bytes, which may end inside a multi-byte character."""
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start >= len(head) - 3:  # cut inside the last character
            return head[:err.start].decode("utf-8")
        raise


def _check_text(text: str, path: Path) -> None:
    if "\x00" in text:
        raise DataError(f"data file is not text: {path} holds NUL bytes")
    if not text.strip():
        raise DataError(f"data file is empty: {path}")


def _local_file(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(
            f"data file not found: {path} (give a file path, '{HUB_PREFIX}<dataset>/<config>/<split>',"
            f" or one of {', '.join(TEXT_CORPORA)})"
        )
    return path


def _read_file(path: Path) -> str:
    """A .jsonl file's "text" fields joined, or the file as UTF-8 text; never empty, never NUL bytes."""
    if path.suffix == ".jsonl":
        text = SEPARATOR.join(_jsonl_texts(path))
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"data file is not UTF-8 text: {path} ({err.reason} at byte {err.start})") from None
    _check_text(text, path)
    return text


def _jsonl_texts(path: Path) -> list[str]:
    """The "text" field of each non-blank line, with the line number named on a bad row."""
    texts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{number}: expected an object with a string 'text' field")
            texts.append(row["text"])
    return texts


def parse_hub_source(spec: str) -> tuple[str, str | None, str]:
    """'<dataset>[/<config>]/<split>' -> (dataset, config or None, split)."""
    parts = spec.split("/")
    if len(parts) < 2 or not parts[0] or not parts[-1]:
        raise DataError(f"bad hub source '{HUB_PREFIX}{spec}': expected '{HUB_PREFIX}<dataset>/<config>/<split>'")
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return "/".join(parts[:-2]), parts[-2] or None, parts[-1]


def _load_hub(spec: str) -> str:
    """The `text` column of a hub dataset split; every failure becomes one DataError line."""
    spec, _, files = spec.partition("?data_files=")
    name, config, split = parse_hub_source(spec)
    where = (f"hub dataset '{name}'" + (f" ({config})" if config else "") + f" split '{split}'"
             + (f" ({files})" if files else ""))
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        data = datasets.load_dataset(name, config, split=split, **({"data_files": {split: files}} if files else {}))
    except Exception as err:  # noqa: BLE001 - hub/IO errors come in many types; report one line
        if hub_offline():
            reason = "offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) and not in the local cache"
            raise DataError(f"cannot load {where}: {reason}") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(f"cannot load {where}: {type(err).__name__}: {first}") from None
    if "text" not in data.column_names:
        raise DataError(f"{where} has no 'text' column (columns: {', '.join(data.column_names)})")
    text = SEPARATOR.join(t or "" for t in data["text"])  # as GPTQ/SliceGPT do for wikitext
    if not text.strip():
        raise DataError(f"{where} is empty")
    return text


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set: nothing is read from the hub."""
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` as one 1-D long tensor, without special tokens (no BOS/EOS/CLS/SEP).

    The whole text is tokenized in one call; the "sequence longer than model_max_length"
    warning is silenced because callers cut the stream into windows themselves.
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)
