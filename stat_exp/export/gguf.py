"""GGUF export of a (pruned) decoder, so that llama.cpp runs and quantizes it.

    python -m stat_exp.export.gguf FOLDER --outtype f16 --out model.gguf

FOLDER is a saved model (`save_model=true`'s run_dir/model, or any checkpoint of a supported
family). Which llama.cpp architecture the file gets follows from the per-layer counts (the
structure config.json records; the config's own counts for a plain checkpoint):
- every layer alike: the stock architecture of the family (`llama` for Llama, Mistral, SmolLM2;
  `qwen2`, `qwen3`), which every llama.cpp-based runtime loads;
- layers differ: `deci`, llama.cpp's per-layer Llama architecture (per-layer head_count,
  head_count_kv, feed_forward_length; RMSNorm, RoPE, SwiGLU, optional biases). Families whose
  blocks deci cannot express (Qwen3's Q/K norms) are one line: prune them with
  `budget.allocation=uniform`.
The file is written by llama.cpp's own converter (tokenizer, tensor names, Q/K layout) from the
pinned source tree (stat_exp.export.llama_cpp); types beyond the converter's (Q4_K_M ...) come from
llama-quantize applied to the f16 file.

Zero units: llama.cpp's deci reads a layer with no heads as attention-free, but a layer with no
FFN skips its attention output as well, and a zero head count in layer 0 leaves the head size
undefined; so a layer without heads or neurons is refused here. STAT's budget never produces one:
every attention level keeps at least one head per KV group (or one group), and at least
max(1, round_to) neurons per layer (stat_exp.prune.budget).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from stat_exp.errors import ConfigError, UserError
from stat_exp.export import llama_cpp
from stat_exp.export.llama_cpp import OUTTYPES, QUANTIZED
from stat_exp.models.checkpoint import read_config
from stat_exp.models.modeling_stat_pruned import RECORD_KEY
from stat_exp.export.record import ExportError
from stat_exp.export.save import save_pruned
from stat_exp.models import get_adapter

STOCK_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
PER_LAYER_FAMILIES = ("llama", "mistral", "qwen2")  # Llama blocks that deci expresses (Q/K/V biases included)
DRIVER = Path(__file__).with_name("gguf_convert.py")


@dataclass(frozen=True)
class GgufPlan:
    """How a checkpoint is written: the converter class kind and the hyperparameters it is given."""

    kind: Literal["stock", "per_layer"]
    hparams: dict

    @property
    def architecture(self) -> str:
        """The llama.cpp architecture name the file gets (the family's own for `stock`)."""
        return "deci" if self.kind == "per_layer" else "stock"


def layer_counts(config: PretrainedConfig) -> dict[str, list[int]]:
    """Per-layer heads, KV heads and neurons: the recorded structure of a stat-exp export, else the config's."""
    structure = (getattr(config, RECORD_KEY, None) or {}).get("structure")
    if structure:
        return {k: list(structure[k]) for k in ("heads", "kv_heads", "neurons")}
    n = config.num_hidden_layers
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return {"heads": [config.num_attention_heads] * n, "kv_heads": [kv] * n, "neurons": [config.intermediate_size] * n}


def gguf_plan(config: PretrainedConfig, counts: dict[str, list[int]] | None = None) -> GgufPlan:
    """The plan for a model config and its per-layer counts (default: `layer_counts(config)`), or an
    ExportError line for what llama.cpp cannot express."""
    family = config.model_type
    if family not in STOCK_FAMILIES:
        raise ExportError(f"GGUF export supports the Llama-family decoders {', '.join(STOCK_FAMILIES)}; "
                          f"model type {family!r} is not one of them")
    counts = counts or layer_counts(config)
    for key, unit in (("heads", "attention heads"), ("neurons", "FFN neurons")):
        empty = [i for i, c in enumerate(counts[key]) if c < 1]
        if empty:
            raise ExportError(f"layer {empty[0]} keeps no {unit}; llama.cpp cannot run such a layer "
                              "(stat-exp's budget always keeps at least one)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if all(len(set(values)) == 1 for values in counts.values()):
        return GgufPlan("stock", {"num_attention_heads": counts["heads"][0], "num_key_value_heads": counts["kv_heads"][0],
                                  "intermediate_size": counts["neurons"][0], "head_dim": head_dim})
    if family not in PER_LAYER_FAMILIES:
        raise ExportError(f"llama.cpp has no per-layer architecture for {family!r} blocks (deci: "
                          f"{', '.join(PER_LAYER_FAMILIES)}); prune with budget.allocation=uniform for a stock GGUF")
    return GgufPlan("per_layer", {"num_attention_heads": counts["heads"], "num_key_value_heads": counts["kv_heads"],
                                  "intermediate_size": counts["neurons"], "head_dim": head_dim})


def check_ready(outtype: str) -> None:
    """A known type, and the pinned llama.cpp parts that write it are there (else one line)."""
    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype={outtype!r}; allowed: {', '.join(OUTTYPES)}")
    llama_cpp.converter_path()
    if outtype in QUANTIZED:
        llama_cpp.tool("llama-quantize")


def _run(step: str, command: list[str], env: dict[str, str] | None = None) -> None:
    """Run a llama.cpp step; its last output line becomes the one-line error."""
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise ExportError(f"{step} failed: {lines[-1] if lines else f'exit {done.returncode}'}")


def _convert(folder: Path, out: Path, outtype: str, plan: GgufPlan) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, llama_cpp.converter_path())),
           "NO_LOCAL_GGUF": "1"}  # the path above already puts the tree's gguf-py first
    command = [sys.executable, "-P", str(DRIVER), str(folder), str(out), outtype, plan.kind, json.dumps(plan.hparams)]
    _run("llama.cpp's converter", command, env)  # -P: the driver's folder (holding gguf.py) stays off the path


def export_gguf(folder: str | Path, out: str | Path, outtype: str = "f16") -> Path:
    """Write `out` (replacing it whole, never half-written) from a model folder; return it."""
    folder, out = Path(folder), Path(out)
    plan = gguf_plan(read_config(folder))
    check_ready(outtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    if outtype in QUANTIZED:
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            f16 = Path(tmp) / "f16.gguf"
            _convert(folder, f16, "f16", plan)
            return quantize(f16, out, outtype)
    partial = out.with_name(out.name + ".partial")
    _convert(folder, partial, outtype, plan)
    partial.replace(out)
    return out


def quantize(f16: str | Path, out: str | Path, outtype: str) -> Path:
    """llama-quantize an f16 GGUF to one of QUANTIZED (e.g. q4_k_m); `out` is replaced whole."""
    if outtype not in QUANTIZED:
        raise ConfigError(f"outtype={outtype!r} is not made by llama-quantize; allowed: {', '.join(QUANTIZED)}")
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    _run("llama-quantize", [str(llama_cpp.tool("llama-quantize")), str(f16), str(partial), outtype.upper()])
    partial.replace(out)
    return out


def write_gguf(model: nn.Module, tokenizer: PreTrainedTokenizerBase, out: str | Path, outtype: str = "f16",
               task: str = "causal_lm") -> Path:
    """Export a model in memory: saved to a temporary folder (as save_model would), then converted."""
    gguf_plan(model.config, get_adapter(model).structure())  # refuse before spending time on the save
    check_ready(outtype)
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp:
        folder = save_pruned(model, tokenizer, Path(tmp) / "model", task)
        return export_gguf(folder, out, outtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stat_exp.export.gguf", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a saved model folder (e.g. a run's model/)")
    parser.add_argument("--outtype", default="f16", help=f"one of {', '.join(OUTTYPES)} (default f16)")
    parser.add_argument("--out", required=True, help="the .gguf file to write")
    args = parser.parse_args(argv)
    try:
        print(export_gguf(args.folder, args.out, args.outtype))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
