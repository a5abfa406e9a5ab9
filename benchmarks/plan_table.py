"""The planner's table for Llama-2-7B, Llama-2-13B and Llama-2-70B on one 80 GB GPU.

    python -m benchmarks.plan_table

Writes each model's published config.json (no weights) into a local folder and runs the planner on
the paper's job (`experiment=llama2_7b_paper`'s settings: 128 x 2048 calibration tokens, fp16,
the authors' procedure, `pruner=stat_paper`, at 0.5 of the FLOPs) with `device=cuda`, 80 GB of device memory
and the host memory given below declared, so it runs on a machine without a GPU (and offline: evaluation
is perplexity, since the paper's lm-eval tasks load from the hub). The seconds
assume the planner's CUDA throughput (see stat_exp/execution/plan.py); they are a prediction, not a
measurement.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

OUT = Path("outputs/benchmarks/plan_table")
ARCHITECTURES = {  # the published configs' shapes
    "llama2_7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32),
    "llama2_13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40),
    "llama2_70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8),
}
HOSTS_MB = (256 * 1024, 64 * 1024)


def config_folder(name: str) -> Path:
    from transformers import LlamaConfig

    folder = OUT / name
    LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="float16",
                **ARCHITECTURES[name]).save_pretrained(folder)
    return folder


def plan(folder: Path, host_mb: int) -> dict:
    overrides = ["experiment=llama2_7b_paper", f"model.source={folder.resolve()}", f"model.name={folder.name}",
                 "budget.flops=0.5", "device=cuda", "execution.device_memory_mb=81920",
                 f"execution.host_memory_mb={host_mb}", "eval=perplexity", "~eval.lm_eval"]  # lm-eval loads tasks from the hub
    proc = subprocess.run([sys.executable, "-m", "stat_exp.execution", *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    lines = ["| model | host RAM | execution (auto) | peak GPU memory | peak host memory | disk | predicted time |",
             "|---|---|---|---|---|---|---|"]
    for name in ARCHITECTURES:
        folder = config_folder(name)
        for host in HOSTS_MB:
            p = plan(folder, host)
            if "error" in p:
                lines.append(f"| {name} | {host // 1024} GB | {p['error']} |||||")
                continue
            lines.append(f"| {name} | {host // 1024} GB | offload={p['offload']}, stream={p['stream']}, "
                         f"factors={p['factors']} | {p['peak_device_mb'] / 1024:.1f} GB | {p['peak_host_mb'] / 1024:.1f} GB | "
                         f"{p['disk_mb'] / 1024:.0f} GB | {p['seconds'] / 60:.0f} min at {p['tflops']:g} TFLOP/s |")
    from benchmarks.common import report_table

    table = "\n".join(lines)
    (OUT / "plan_table.md").write_text(table + "\n")
    report_table("plan_table", table, "The planner's prediction (no measurement) for the paper's job on each model's "
                 "published config: 128 x 2048 calibration tokens, fp16, the authors' procedure (pruner=stat_paper) at 0.5 of "
                 "the FLOPs, device=cuda with "
                 "80 GB of device memory and the host RAM of the column declared; the time assumes the planner's CUDA "
                 "throughput (stat_exp/execution/plan.py).")


if __name__ == "__main__":
    main()
