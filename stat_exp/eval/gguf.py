"""`eval=gguf`: the job's (pruned) model exported to GGUF and measured in llama.cpp.

Records
- `gguf/ppl`: llama-perplexity on the text (`text_file`, `seq_len`, `max_tokens` mean what they
  mean for eval=perplexity: the same windows of the same tokens). llama.cpp scores only the second
  half of each window (the first half is context; see stat_exp.eval.llama_cpp_tools), so its number
  is lower than `perplexity/ppl`'s, which scores every position. `gguf/torch_ppl` is the model in
  memory on exactly llama.cpp's protocol (eval=perplexity with protocol=llama_cpp gives the same
  number), so the two compare one to one: their ratio is what the export and `outtype` cost;
- `gguf/prefill_tokens_per_s`, `gguf/decode_tokens_per_s` (and `_std`): llama-bench's prompt
  processing of `prompt_tokens` tokens and generation of `gen_tokens` tokens, `repeats` runs each,
  on `threads` CPU threads (None: all the process may use);
- `gguf/file_mb`: the size of the file at `outtype` (f32 | f16 | q8_0 | q4_0 | q4_k_m | q5_k_m | q6_k).
The file is written to a temporary folder and removed; `save_gguf=<outtype>` (with save_model=true)
keeps one beside the run's model/.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Literal

import torch
from annotated_types import Ge
from torch import nn
from transformers import PreTrainedTokenizerBase

from stat_exp.types import PositiveInt
from stat_exp.data.text import load_text
from stat_exp.eval.base import Evaluator
from stat_exp.eval.llama_cpp_tools import llama_bench, llama_perplexity
from stat_exp.eval.perplexity import perplexity
from stat_exp.export import llama_cpp
from stat_exp.export.gguf import check_ready, write_gguf
from stat_exp.export.llama_cpp import OUTTYPES


class GgufEval(Evaluator):
    """Perplexity and speed of the model in llama.cpp, at one GGUF type."""

    name = "gguf"

    def __init__(self, outtype: Literal[OUTTYPES] = "f16", text_file: str | None = None,
                 seq_len: Annotated[int, Ge(4)] = 256, max_tokens: PositiveInt | None = 16384,
                 prompt_tokens: PositiveInt = 512, gen_tokens: PositiveInt = 128, repeats: PositiveInt = 3,
                 threads: PositiveInt | None = None, batch_size: PositiveInt = 8, progress: bool = True):
        """Text options as eval=perplexity's; `batch_size` only for gguf/torch_ppl. Checks that the
        pinned llama.cpp is built (`make llama-cpp`) before any weight loads."""
        check_ready(outtype)
        for tool in ("llama-perplexity", "llama-bench"):
            llama_cpp.tool(tool)
        self.outtype, self.source, self.seq_len, self.max_tokens = outtype, text_file or "wiki_eval", seq_len, max_tokens
        self.prompt_tokens, self.gen_tokens, self.repeats, self.threads = prompt_tokens, gen_tokens, repeats, threads
        self.batch_size, self.progress = batch_size, progress

    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> dict[str, float]:
        text = load_text(self.source)
        torch_ppl = perplexity(model, tokenizer, text, self.seq_len, self.max_tokens, self.batch_size, device,
                               self.progress, protocol="llama_cpp")["ppl"]
        with tempfile.TemporaryDirectory(prefix="stat-exp-gguf-") as tmp:
            text_file = Path(tmp) / "text.txt"
            text_file.write_text(text, encoding="utf-8")
            gguf = write_gguf(model, tokenizer, Path(tmp) / f"model-{self.outtype}.gguf", self.outtype)
            # as make_chunks: the windows that fit in the first max_tokens tokens (llama.cpp caps by its own count)
            chunks = self.max_tokens // self.seq_len if self.max_tokens is not None else None
            ppl = llama_perplexity(gguf, text_file, self.seq_len, chunks, self.threads)
            bench = llama_bench(gguf, self.prompt_tokens, self.gen_tokens, self.threads, self.repeats)
            file_mb = gguf.stat().st_size / 2**20
        metrics = {"ppl": ppl, "torch_ppl": torch_ppl, "file_mb": file_mb,
                   "prefill_tokens_per_s": bench["pp"].tokens_per_s, "prefill_tokens_per_s_std": bench["pp"].std,
                   "decode_tokens_per_s": bench["tg"].tokens_per_s, "decode_tokens_per_s_std": bench["tg"].std}
        return {f"{self.name}/{k}": v for k, v in metrics.items()}
