"""Perplexity of a causal LM on a text, by the standard fixed-window protocol.

Protocol (as in GPTQ / SparseGPT / SliceGPT / Wanda, except for special tokens):
- tokenize the whole text once, with no special tokens at all (no BOS is prepended, even for
  tokenizers that have one, so every model and tokenizer is treated the same way);
- keep at most `max_tokens` tokens, cut them into non-overlapping chunks of `seq_len` tokens and
  drop the ragged tail;
- each chunk is an independent sequence: it predicts its last seq_len - 1 tokens;
- perplexity = exp(mean negative log-likelihood over all predicted tokens).
The loss is computed here from `.logits` in float32, so any Hugging Face causal LM works, whatever
its own loss function or dtype.

`protocol="llama_cpp"` is llama.cpp's `llama-perplexity -c seq_len` on the same windows, so that
its numbers (eval=gguf) and ours compare: only the second half of each window is scored (the
logits at positions seq_len//2 .. seq_len-2, predicting the last seq_len//2 - 1 tokens; the first
half is context only), and where the tokenizer adds a BOS token the stream starts with it and
each window's first token is replaced by it. The default, `standard`, scores every position.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, get_args

import torch
import torch.nn.functional as F
from annotated_types import Ge
from tqdm.auto import tqdm

from stat_exp.data.text import DataError, check_text_source, encode, load_text
from stat_exp.eval.base import Evaluator
from stat_exp.types import PositiveInt

Protocol = Literal["standard", "llama_cpp"]
PROTOCOLS = get_args(Protocol)


def perplexity(
    model,
    tokenizer,
    text: str,
    seq_len: int,
    max_tokens: int | None,
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
    protocol: Protocol = "standard",
) -> dict[str, float]:
    """{"ppl", "nll" (mean per predicted token, nats), "tokens" (number of predicted tokens)}."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    first = seq_len // 2 if protocol == "llama_cpp" else 0  # logits before `first` are not scored
    if seq_len - 1 - first < 1:
        raise ValueError(f"seq_len={seq_len} predicts nothing under the {protocol} protocol")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive or None, got {max_tokens}")
    ids = encode(tokenizer, text)
    bos = added_bos(tokenizer) if protocol == "llama_cpp" else None
    if bos is not None:
        ids = torch.cat([ids.new_tensor([bos]), ids])
    chunks = make_chunks(ids, seq_len, max_tokens)
    if bos is not None:
        chunks[:, 0] = bos
    total, count = _sum_nll(model, chunks, batch_size, torch.device(device), progress, first)
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


def added_bos(tokenizer) -> int | None:
    """The BOS id a tokenizer puts before encoded text (None when it adds none), as llama.cpp does."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if bos is not None and ids[:1] == [bos] else None


def make_chunks(ids: torch.Tensor, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """(n_chunks, seq_len) non-overlapping chunks of the first max_tokens ids; tail dropped."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_chunks = ids.numel() // seq_len
    if n_chunks == 0:
        raise DataError(
            f"evaluation text has {ids.numel()} tokens (after max_tokens), fewer than one chunk of seq_len={seq_len}"
        )
    return ids[: n_chunks * seq_len].view(n_chunks, seq_len)


def _sum_nll(
    model, chunks: torch.Tensor, batch_size: int, device: torch.device, progress: bool, first: int = 0
) -> tuple[float, int]:
    """Summed float64 NLL of the tokens each window predicts from position `first` on, and their
    number, in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            batches = chunks.split(batch_size)
            for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
                batch = batch.to(device)
                logits = model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False).logits
                total += _batch_nll(logits, batch, first)
                count += batch.shape[0] * (batch.shape[1] - 1 - first)
    finally:
        model.train(was_training)
    return total, count


def _batch_nll(logits: torch.Tensor, batch: torch.Tensor, first: int = 0) -> float:
    """Summed NLL of a batch (logits from position `first` on); one row at a time to bound the
    float32 copy of the logits."""
    total = 0.0
    for row_logits, row_ids in zip(logits, batch):
        nll = F.cross_entropy(row_logits[first:-1].float(), row_ids[first + 1:], reduction="sum")
        total += float(nll.double())
    return total


class PerplexityEval(Evaluator):
    """`eval=perplexity`: perplexity on a local text file, or on the embedded wiki evaluation split."""

    name = "perplexity"
    tasks = ("causal_lm",)

    def __init__(self, text_file: str | None = None, seq_len: Annotated[int, Ge(2)] = 256,
                 max_tokens: PositiveInt | None = 16384, batch_size: PositiveInt = 8, progress: bool = True,
                 protocol: Protocol = "standard"):
        """`text_file`: a local .txt/.jsonl file (None: the embedded wiki evaluation split); at most
        `max_tokens` tokens (None: all) in chunks of `seq_len`. `protocol`: `standard` scores every
        position of a chunk, `llama_cpp` its second half as llama-perplexity does (see the module)."""
        self.source = text_file or "wiki_eval"
        self.seq_len, self.max_tokens, self.batch_size, self.progress = seq_len, max_tokens, batch_size, progress
        self.protocol = protocol

    def lengths(self) -> tuple[int, int]:
        return self.batch_size, self.seq_len

    def check(self) -> None:
        check_text_source(self.source)

    def __call__(self, model, tokenizer, device) -> dict[str, float]:
        result = perplexity(model, tokenizer, load_text(self.source), self.seq_len, self.max_tokens,
                            self.batch_size, device, self.progress, self.protocol)
        return {f"{self.name}/{k}": v for k, v in result.items()}
