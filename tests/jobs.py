"""Real command-line jobs on a tiny random model saved to a folder and a local text file: what sweep,
resume, plug-in and packaging tests run, in seconds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from stat_exp.assets import cache_dir
from stat_exp.data.text import load_text
from stat_exp.track.sweep import job_folders
from tests.tiny import save_tiny_causal_lm

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
       "STAT_EXP_CACHE": str(cache_dir()),  # keeps the prepared assets when a test moves HOME
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


@dataclass(frozen=True)
class TinyJob:
    """A saved tiny causal LM and a text file, and the overrides of a job that runs on them."""

    model_dir: Path
    text: Path

    def args(self, *extra: str, **changes: str) -> list[str]:
        """The overrides, with `changes` replacing, adding or (None) dropping values: args(**{"budget.flops": 0.5})."""
        values = {"model.source": self.model_dir, "model.name": "tiny", "pruner": "magnitude_sp",
                  "budget.flops": 0.8, "budget.seq_len": 32, "calib.source": self.text, "calib.num_examples": 4,
                  "calib.seq_len": 32, "eval.perplexity.text_file": self.text, "eval.perplexity.seq_len": 32,
                  "eval.perplexity.max_tokens": 128, "logger": "none", "progress": "false"} | changes
        return [f"{key}={value}" for key, value in values.items() if value is not None] + list(extra)


def make_tiny_job(folder: Path, tokenizer) -> TinyJob:
    folder.mkdir(parents=True, exist_ok=True)
    save_tiny_causal_lm(folder / "model", tokenizer)
    text = folder / "text.txt"
    text.write_text(load_text("wiki_eval")[:20_000], encoding="utf-8")
    return TinyJob(folder / "model", text)


def run_cli(args: list[str], cwd: Path, executable: str | None = None, env: dict | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """`stat-exp <args>` (python -m stat_exp.run unless an installed console script is given)."""
    command = [executable] if executable else [sys.executable, "-m", "stat_exp.run"]
    return subprocess.run([*command, *args], cwd=cwd, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout)


def statuses(sweep: Path) -> dict[str, str]:
    """{job subdirectory: status} of every job's results.json in a sweep directory (not the runs moved
    aside into a job's previous-* folder)."""
    return {job: json.loads((sweep / job / "results.json").read_text())["status"]
            for job in job_folders(sweep) if (sweep / job / "results.json").exists()}


KILLER = '''
import os, signal
from pathlib import Path
from stat_exp.prune.magnitude import MagnitudePruner


class KillOnce(MagnitudePruner):
    """Magnitude pruning whose first run is killed half-way (SIGKILL, as the out-of-memory killer or a
    pre-empted cluster job does); later runs go through."""

    name = "kill_once"

    def __init__(self, marker: str):
        super().__init__(allocation="uniform")
        self.marker = Path(marker)

    def prepare(self, model, adapter, batches, *args, **kwargs):
        if not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
'''


def kill_once_plugin(folder: Path) -> tuple[list[str], dict]:
    """A plug-in pruner `kill_once` from a config dir outside the package (--config-dir, module on
    PYTHONPATH): the command-line flags and the environment that use it."""
    plugin = folder / "plugin"
    (plugin / "pruner").mkdir(parents=True)
    (plugin / "killing.py").write_text(KILLER)
    (plugin / "pruner" / "kill_once.yaml").write_text(
        yaml.safe_dump({"_target_": "killing.KillOnce", "marker": str(folder / "killed")}))
    return ["--config-dir", str(plugin)], {**ENV, "PYTHONPATH": f"{plugin}{os.pathsep}{ENV['PYTHONPATH']}"}
