"""Write a GGUF with llama.cpp's own converter classes (run as a script, never imported by stat-exp).

The converter in the pinned llama.cpp tree (`conversion/`) needs the `gguf-py` of the same tree,
which is newer than the `gguf` release on PyPI that transformers uses; so stat_exp.export.gguf
runs this file in a child Python whose path starts with that tree. It receives the converter's
hyperparameters, with the per-layer counts already worked out, and only picks the class:
- `stock`: the converter's class for the checkpoint's architecture (e.g. LlamaModel, Qwen2Model);
- `per_layer`: LlamaModel's tensors, tokenizer and metadata, written as llama.cpp's `deci`
  architecture, which reads per-layer `head_count`, `head_count_kv` and `feed_forward_length`.
  The hyperparameters carry those counts as lists, which the converter's writer stores as arrays;
  Q and K rows are permuted for llama.cpp's RoPE layout with each layer's own head counts.
Usage: python gguf_convert.py FOLDER OUT OUTTYPE {stock|per_layer} HPARAMS_JSON
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import gguf
import torch
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
from conversion.llama import LlamaModel

FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


class PerLayerLlama(LlamaModel):
    """Llama blocks with their own head, KV-head and FFN counts in every layer (llama.cpp `deci`)."""

    model_arch = gguf.MODEL_ARCH.DECI
    undo_permute = False  # LlamaModel permutes with one head count for all layers; done per layer below

    def modify_tensors(self, data_torch: torch.Tensor, name: str, bid: int | None):
        if bid is not None and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            heads = self.hparams["num_attention_heads"][bid]
            kv_heads = heads if ".q_proj." in name else self.hparams["num_key_value_heads"][bid]
            data_torch = LlamaModel.permute(data_torch, heads, kv_heads)
        yield from super().modify_tensors(data_torch, name, bid)


def main(folder: str, out: str, outtype: str, kind: str, overrides: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    hparams = {**ModelBase.load_hparams(Path(folder), False), **json.loads(overrides)}
    if kind == "per_layer":
        cls = PerLayerLlama
    else:
        architecture = get_model_architecture(hparams, ModelType.TEXT)
        try:
            cls = get_model_class(architecture)
        except NotImplementedError:
            sys.exit(f"llama.cpp's converter does not support the architecture {architecture}")
    with torch.inference_mode():
        cls(Path(folder), FILE_TYPES[outtype], Path(out), hparams=hparams).write()


if __name__ == "__main__":
    main(*sys.argv[1:])
