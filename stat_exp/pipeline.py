"""One run, as a straight line: load -> calibrate -> prune -> evaluate -> record.

Callable from Python with any DictConfig of the shape conf/config.yaml composes; run.py only
adds Hydra around it.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stat_exp.device import resolve_device
from stat_exp.errors import ConfigError
from stat_exp.eval.base import Evaluator
from stat_exp.models import get_adapter
from stat_exp.models.saving import save_pruned
from stat_exp.offload import open_model
from stat_exp.plan import make_plan
from stat_exp.prune.base import Pruner
from stat_exp.prune.none import NoPruner
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.runner import PruneRunner
from stat_exp.track.results import RunRecord, Timings, config_hash, peak_rss_mb
from stat_exp.track.wandb_logger import make_logger


def validate(cfg: DictConfig) -> None:
    """Reject bad values before anything expensive happens."""
    flops = cfg.budget.flops
    if not isinstance(flops, (int, float)) or not 0 < flops <= 1:
        raise ConfigError(f"budget.flops={flops} must be a number in (0, 1]")
    for key in ("num_examples", "batch_size"):
        if key in cfg.calib and int(cfg.calib[key]) < 1:
            raise ConfigError(f"calib.{key}={cfg.calib[key]} must be a positive integer")
    if int(cfg.budget.round_to) < 1:
        raise ConfigError(f"budget.round_to={cfg.budget.round_to} must be a positive integer")


def variant_of(cfg: DictConfig, pruner: Pruner) -> str | None:
    """What distinguishes this job from the default protocol (for tables and plots): the pruner's
    own variant, a non-global allocation (the budget's, or the one the pruner fixes), propagation."""
    allocation = pruner.allocation_under(cfg.budget.allocation)
    propagate = pruner.propagate_under(cfg.calib.propagate)
    parts = [p for p in (pruner.variant, allocation if allocation != "global" else "",
                         f"propagate {propagate}" if propagate != "dense" else "") if p]
    return ", ".join(parts) or None


def run_pipeline(cfg: DictConfig, run_dir: Path, sweep_dir: Path | None = None) -> RunRecord:
    """Run one job and write run_dir/results.json (status failed, with the error, if it fails)."""
    run_dir = Path(run_dir)
    plain = OmegaConf.to_container(cfg, resolve=True)
    timings = Timings()
    record = RunRecord(model=cfg.model.name, pruner=str(cfg.pruner.get("_target_", "?")).rsplit(".", 1)[-1],
                       target={"flops_fraction": cfg.budget.flops},
                       seed=cfg.seed, config_hash=config_hash(plain))
    logger = make_logger(cfg.logger, run_dir, plain, sweep_dir, job_name=run_dir.name)
    try:
        with timings("total"):
            record.write(run_dir)
            validate(cfg)
            torch.manual_seed(cfg.seed)
            device = resolve_device(cfg.device)
            pruner: Pruner = instantiate(cfg.pruner)
            record.pruner, record.variant = pruner.name, variant_of(cfg, pruner)
            backend = instantiate(cfg.factorization, device=device) if pruner.needs_factorization else None
            record.factorization = backend.name if backend else None
            evaluators = make_evaluators(cfg.eval, run_dir)
            calibration = instantiate(cfg.calib)
            prunes = pruner.prunes and cfg.budget.flops < 1
            plan = make_plan(cfg, device, run_dir, prunes)  # before any weight is read
            record.execution, record.plan = asdict(plan.execution), plan.summary()
            work_dir = Path(cfg.execution.dir) if cfg.execution.dir else run_dir / "offload"
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with timings("load"):
                model, tokenizer, store = open_model(cfg.model.source, cfg.model.task, cfg.model.dtype, device,
                                                     plan.execution.offload, work_dir / "blocks")
            try:
                adapter = get_adapter(model)
                batches, examples = [], None
                if prunes and pruner.needs_calibration:
                    with timings("calibrate"):
                        batches = calibration.batches(tokenizer)
                        if pruner.prepare_examples:
                            examples = calibration.batches(tokenizer, num_examples=pruner.prepare_examples)
                budget = BudgetSpec(cfg.budget.flops if prunes else 1.0, cfg.budget.seq_len,
                                    cfg.budget.allocation, cfg.budget.round_to)
                runner = PruneRunner(pruner if prunes else NoPruner(), budget, backend, calibration.propagate,
                                     cfg.progress, plan.execution.stream, plan.execution.factors, work_dir / "factors")
                outcome = runner.run(model, adapter, batches, device, store, examples)
                for key, seconds in outcome.timing_s.items():
                    timings.seconds[key] = timings.seconds.get(key, 0.0) + seconds
                record.achieved, record.structure = outcome.achieved, outcome.structure
                store.prepare_for_eval()
                with timings("eval"):
                    record.metrics = evaluate(evaluators, model, tokenizer, device)
                if cfg.save_model:
                    _save(model, tokenizer, run_dir / "model", cfg.model.task)
            finally:
                store.close()
                if device.type == "cuda":
                    record.peak_device_mb = torch.cuda.max_memory_allocated(device) / 2**20
        record.status = "ok"
    except BaseException as e:
        record.status, record.error = "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        raise
    finally:
        record.timing_s, record.peak_rss_mb = timings.seconds, peak_rss_mb()
        record.write(run_dir)
        if record.status == "ok":
            logger.log_metrics({**record.metrics, **{f"achieved/{k}": v for k, v in record.achieved.items()},
                                **{f"timing_s/{k}": v for k, v in record.timing_s.items()}})
            logger.log_structure(record.structure)
        logger.finish(record.status)
    return record


def make_evaluators(eval_cfg: DictConfig, run_dir: Path) -> dict[str, Evaluator]:
    """One evaluator per entry of `eval` (`eval=[perplexity,latency]` composes several), built before
    the model loads so a bad evaluation setting fails first. Evaluators that write files (tables)
    get the run directory unless their config names one."""
    if not eval_cfg:
        raise ConfigError("eval is empty; choose at least one evaluator, e.g. eval=perplexity")
    evaluators = {}
    for name, sub in eval_cfg.items():
        extra = {"output_dir": str(run_dir)} if "output_dir" in sub and sub.output_dir is None else {}
        evaluators[name] = instantiate(sub, **extra)
    return evaluators


def evaluate(evaluators: dict[str, Evaluator], model, tokenizer, device: torch.device) -> dict[str, float]:
    """Run every evaluator on the same (pruned) model; metric keys are prefixed by evaluator, so
    a clash means two evaluators of the same kind."""
    metrics: dict[str, float] = {}
    for name, evaluator in evaluators.items():
        result = evaluator(model, tokenizer, device)
        clash = sorted(set(result) & set(metrics))
        if clash:
            raise ConfigError(f"eval.{name} writes metrics another evaluator already wrote: {', '.join(clash)}")
        metrics.update(result)
    return metrics


def _save(model, tokenizer, path: Path, task: str) -> None:
    """Write the model folder next to results.json, replacing it whole (never half of it)."""
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pruned(model, tokenizer, tmp, task)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
