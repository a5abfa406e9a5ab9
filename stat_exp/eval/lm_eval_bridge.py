"""lm-evaluation-harness on the (pruned) model in memory: no save and reload between pruning and eval.

Tasks are names or inline lm-eval task configs (dicts with a ``task`` key):
- our offline tasks (stat_exp.eval.tasks): stat_analogies, stat_lastword, stat_pang_lee, stat_wiki_ppl;
- any standard lm-eval task or group (wikitext, piqa, arc_easy, hellaswag, ...), which needs the
  Hugging Face hub, or its datasets already in the local cache when offline.
Tasks are loaded when the evaluator is built, so a bad or unreachable task fails before pruning.
Metrics come back as ``lm_eval/<task>/<metric>`` (and ``<metric>_stderr``), lm-eval's ",none"
filter suffix dropped (another filter is kept: ``<metric>/<filter>``). With ``output_dir`` the run
also gets lm-eval's own markdown table, ``lm_eval.md``.
"""
from __future__ import annotations

import copy
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from annotated_types import Gt, Lt, MinLen
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from transformers import GenerationMixin, PreTrainedTokenizerBase

from stat_exp.config.types import NonNegativeInt, PositiveInt
from stat_exp.errors import ConfigError, UserError
from stat_exp.eval.base import Evaluator
from stat_exp.eval.tasks import TASK_NAMES, prepare_tasks, write_atomic

if TYPE_CHECKING:  # lm_eval is imported when used: it is slow to import
    from lm_eval.api.group import Group
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

TABLE_FILE = "lm_eval.md"
TaskSpec = str | dict[str, Any]


class LMEvalEval(Evaluator):
    """lm-eval tasks scored on the model object through HFLM."""

    name = "lm_eval"

    def __init__(
        self,
        tasks: Annotated[Sequence[TaskSpec], MinLen(1)] | str,
        batch_size: PositiveInt | Literal["auto"] = 8,
        limit: PositiveInt | Annotated[float, Gt(0), Lt(1)] | None = None,
        samples: Mapping[str, Sequence[NonNegativeInt]] | None = None,
        bootstrap_iters: NonNegativeInt = 1000,
        output_dir: str | Path | None = None,
    ):
        """`batch_size="auto"`: lm-eval finds the largest that fits. `limit`: documents per task, a
        count or a fraction (testing only); `samples`: {task: [document indices]} instead of limit;
        `bootstrap_iters=0`: no stderrs. `output_dir`: where lm_eval.md goes (None: not written)."""
        self.specs = _plain_specs(tasks)
        self.samples = _plain(samples)
        if limit is not None and self.samples is not None:
            raise ConfigError("eval.lm_eval.limit and eval.lm_eval.samples exclude each other: set one of them to null")
        self.batch_size, self.limit, self.bootstrap_iters = batch_size, limit, bootstrap_iters
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._manager, self._tasks = load_tasks(self.specs)

    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> dict[str, float]:
        results = self.results(model, tokenizer, device)
        if self.output_dir is not None:
            write_table(results, self.output_dir)
        return metrics_of(results)

    def results(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                log_samples: bool = False) -> dict[str, Any]:
        """lm-eval's whole results dict (per-document records under "samples" with log_samples)."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        if not isinstance(model, GenerationMixin):
            raise UserError(f"eval=lm_eval needs a causal language model; got {type(model).__name__}")
        # HFLM sets a pad token on the tokenizer it gets: give it a copy, not the run's tokenizer.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=self.batch_size, device=str(device))
        return simple_evaluate(lm, tasks=list(self._tasks), task_manager=self._manager, limit=self.limit,
                               samples=self.samples, bootstrap_iters=self.bootstrap_iters, log_samples=log_samples)


def load_tasks(specs: Sequence[TaskSpec]) -> tuple[TaskManager, list[Task | Group]]:
    """(TaskManager, the built Task/Group objects), one clear UserError for a bad or unreachable task.

    lm-eval's ~15k built-in task configs are indexed only when a standard name is asked for.
    """
    names = [s for s in specs if isinstance(s, str)]
    standard = [n for n in names if n not in TASK_NAMES]
    include_path = prepare_tasks([n for n in names if n in TASK_NAMES])
    manager = task_manager(str(include_path), bool(standard), tuple(sorted(p.name for p in include_path.glob("*.yaml"))))
    for name in standard:
        if name not in manager.all_tasks:
            raise UserError(f"unknown lm_eval task '{name}'; offline tasks: {', '.join(TASK_NAMES)}; standard "
                            "lm-eval task names (wikitext, piqa, arc_easy, hellaswag, ...) are accepted online")
    return manager, [obj for spec in specs for obj in _load(manager, spec)]


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str, include_defaults: bool, task_files: tuple[str, ...]) -> TaskManager:
    """One TaskManager per task folder content: indexing the built-in tasks takes 10-20 s on a
    laptop, which a notebook evaluating several models should pay once. `task_files` is only part
    of the cache key (a task prepared later means a new index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _load(manager: TaskManager, spec: TaskSpec) -> list[Task | Group]:
    """The top-level objects of one spec: its Group, or its Task(s) (a tag gives several)."""
    name = spec if isinstance(spec, str) else spec.get("task", spec.get("group"))
    try:
        loaded = manager.load([spec])
    except Exception as err:  # noqa: BLE001 - hub, dataset and config errors come in many types
        if name in TASK_NAMES:
            raise  # our own task failing is a bug: keep the traceback
        raise _load_error(name, isinstance(spec, str), err) from None
    group = loaded["groups"].get(name)
    return [group] if group is not None else list(loaded["tasks"].values())


def _load_error(name: str, standard: bool, err: Exception) -> UserError:
    if standard and _offline():
        return UserError(f"lm_eval task '{name}' needs the Hugging Face hub, which is offline here; "
                         f"offline tasks: {', '.join(TASK_NAMES)}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return UserError(f"lm_eval task '{name}' could not be loaded: {type(err).__name__}: {first}")


def _offline() -> bool:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set (as the hub and datasets libraries read them)."""
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def metrics_of(results: Mapping[str, Any]) -> dict[str, float]:
    """{"lm_eval/<task>/<metric>[_stderr]": value} for every numeric metric of every task and group."""
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, sep, filt = key.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # "alias", "sample_len", stderr "N/A"
            name = metric if filt == "none" else f"{metric}/{filt}"
            metrics[f"{LMEvalEval.name}/{task}/{name}"] = float(value)
    return metrics


def write_table(results: Mapping[str, Any], output_dir: Path) -> Path:
    """lm-eval's markdown table(s), as its CLI prints them, into output_dir/lm_eval.md."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    path = Path(output_dir) / TABLE_FILE
    write_atomic(path, text)
    return path


def _plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) -> plain Python, which lm-eval expects."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _plain_specs(tasks: Sequence[TaskSpec] | str) -> list[TaskSpec]:
    return [tasks] if isinstance(tasks, str) else [_plain(t) for t in tasks]
