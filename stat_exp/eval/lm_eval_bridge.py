"""lm-evaluation-harness on the (pruned) model in memory: no save and reload between pruning and eval.

Tasks are names or inline lm-eval task configs (dicts with a ``task`` key):
- our offline tasks (stat_exp.eval.tasks): stat_analogies, stat_lastword, stat_pang_lee, stat_wiki_ppl;
- any standard lm-eval task or group (wikitext, piqa, arc_easy, hellaswag, ...), which needs the
  Hugging Face hub, or its datasets already in the local cache when offline.
Tasks are loaded when the evaluator is built, so a bad or unreachable task fails before pruning.
Metrics come back as ``lm_eval/<task>/<metric>`` (and ``<metric>_stderr``), lm-eval's ",none"
filter suffix dropped (another filter is kept: ``<metric>/<filter>``). With ``output_dir`` the run
also gets lm-eval's own markdown table, ``lm_eval.md``, and its results JSON, ``lm_eval_results.json``
(task versions, n-shot, task configs, seeds; per-document samples left out), as its CLI writes them.

The options of lm-eval's command line that change a result pass through: ``num_fewshot``, ``seed``
(one int for all four of lm-eval's seeds, or [python, numpy, torch, fewshot] with null to leave
one unset; lm-eval's default 0,1234,1234,1234), ``apply_chat_template`` with
``fewshot_as_multiturn``, and the caches: ``cache_requests`` (lm-eval's cache of built requests)
and ``use_cache``, a database of model answers. That one is keyed by request, not by weights: a
relative path lands in the run directory, so differently pruned models never share it.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from annotated_types import Gt, Lt, MinLen
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from transformers import GenerationMixin, PreTrainedTokenizerBase

from stat_exp.errors import ConfigError, UserError
from stat_exp.eval.base import Evaluator
from stat_exp.eval.tasks import TASK_NAMES, prepare_tasks, write_atomic
from stat_exp.types import NonNegativeInt, PositiveInt

if TYPE_CHECKING:  # lm_eval is imported when used: it is slow to import
    from lm_eval.api.group import Group
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

TABLE_FILE = "lm_eval.md"
RESULTS_FILE = "lm_eval_results.json"
LM_EVAL_SEEDS = (0, 1234, 1234, 1234)  # lm-eval's defaults: python random, numpy, torch, few-shot sampler
TaskSpec = str | dict[str, Any]


class LMEvalEval(Evaluator):
    """lm-eval tasks scored on the model object through HFLM."""

    name = "lm_eval"
    tasks = ("causal_lm",)  # HFLM scores continuations with a causal LM head

    def __init__(
        self,
        tasks: Annotated[Sequence[TaskSpec], MinLen(1)] | str,
        batch_size: PositiveInt | Literal["auto"] = 8,
        limit: PositiveInt | Annotated[float, Gt(0), Lt(1)] | None = None,
        samples: Mapping[str, Sequence[NonNegativeInt]] | None = None,
        bootstrap_iters: NonNegativeInt = 1000,
        output_dir: str | Path | None = None,
        num_fewshot: NonNegativeInt | None = None,
        seed: int | Sequence[int | None] = LM_EVAL_SEEDS,
        apply_chat_template: bool | str = False,
        fewshot_as_multiturn: bool | None = None,
        use_cache: str | None = None,
        cache_requests: bool = False,
        rewrite_requests_cache: bool = False,
        delete_requests_cache: bool = False,
    ):
        """`batch_size="auto"`: lm-eval finds the largest that fits. `limit`: documents per task, a
        count or a fraction (testing only); `samples`: {task: [document indices]} instead of limit;
        `bootstrap_iters=0`: no stderrs. `output_dir`: where lm_eval.md and lm-eval's own results JSON
        go (None: not written). `fewshot_as_multiturn` null: on exactly when a chat template is applied
        (lm-eval's CLI)."""
        self.specs = _plain_specs(tasks)
        self.samples = _plain(samples)
        if limit is not None and self.samples is not None:
            raise ConfigError("eval.lm_eval.limit and eval.lm_eval.samples exclude each other: set one of them to null")
        self.seeds = _seeds(_plain(seed))
        self.batch_size, self.limit, self.bootstrap_iters = batch_size, limit, bootstrap_iters
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.num_fewshot, self.apply_chat_template = num_fewshot, apply_chat_template
        self.fewshot_as_multiturn = bool(apply_chat_template) if fewshot_as_multiturn is None else fewshot_as_multiturn
        if use_cache is not None and not Path(use_cache).is_absolute() and self.output_dir is not None:
            use_cache = str(self.output_dir / use_cache)
        self.cache = {"use_cache": use_cache, "cache_requests": cache_requests,
                      "rewrite_requests_cache": rewrite_requests_cache, "delete_requests_cache": delete_requests_cache}
        self._manager, self._tasks = load_tasks(self.specs)

    def lengths(self) -> tuple[int, int]:
        return (self.batch_size if isinstance(self.batch_size, int) else 8), 256  # "auto": lm-eval's own choice

    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> dict[str, float]:
        results = self.results(model, tokenizer, device)
        if self.output_dir is not None:
            write_table(results, self.output_dir)
            write_results(results, self.output_dir)
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
        random_seed, numpy_seed, torch_seed, fewshot_seed = self.seeds
        return simple_evaluate(lm, tasks=list(self._tasks), task_manager=self._manager, limit=self.limit,
                               samples=self.samples, bootstrap_iters=self.bootstrap_iters, log_samples=log_samples,
                               num_fewshot=self.num_fewshot, apply_chat_template=self.apply_chat_template,
                               fewshot_as_multiturn=self.fewshot_as_multiturn, random_seed=random_seed,
                               numpy_random_seed=numpy_seed, torch_random_seed=torch_seed,
                               fewshot_random_seed=fewshot_seed, **self.cache)


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
    except Exception as err:
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


def write_results(results: Mapping[str, Any], output_dir: Path) -> Path:
    """lm-eval's results JSON as its CLI saves it (versions, n-shot, configs, seeds), without the
    per-document samples, into output_dir/lm_eval_results.json."""
    from lm_eval.utils import handle_non_serializable

    kept = {k: v for k, v in results.items() if k != "samples"}
    path = Path(output_dir) / RESULTS_FILE
    write_atomic(path, json.dumps(kept, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return path


def _seeds(seed: int | Sequence[int | None]) -> tuple[int | None, ...]:
    """lm-eval's four seeds from one int (all four) or a list of four (null: leave that one unset)."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        return (seed,) * 4
    if (isinstance(seed, Sequence) and not isinstance(seed, str) and len(seed) == 4
            and all(s is None or (isinstance(s, int) and not isinstance(s, bool)) for s in seed)):
        return tuple(seed)
    raise ConfigError(f"eval.lm_eval.seed={seed!r} must be an integer or a list of 4 (python, numpy, torch, "
                      "few-shot), null for one left unset")


def _plain(value: Any) -> Any:
    """OmegaConf containers (from Hydra) -> plain Python, which lm-eval expects."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _plain_specs(tasks: Sequence[TaskSpec] | str) -> list[TaskSpec]:
    return [tasks] if isinstance(tasks, str) else [_plain(t) for t in tasks]
