"""One run, as a straight line: load -> calibrate -> prune -> evaluate -> record.

Callable from Python with any DictConfig of the shape conf/config.yaml composes; run.py only
adds Hydra around it.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from stat_exp.config.validate import checked_config
from stat_exp.data.base import Calibration
from stat_exp.data.calib_size import real_tokens
from stat_exp.device import resolve_device
from stat_exp.errors import ConfigError, one_line
from stat_exp.eval.base import Evaluator
from stat_exp.eval.gguf import GgufEval
from stat_exp.execution.offload import open_model
from stat_exp.execution.plan import make_plan
from stat_exp.export.gguf import check_ready, export_gguf
from stat_exp.export.llama_cpp import width_warning
from stat_exp.export.lineage import against_dense
from stat_exp.export.save import save_pruned
from stat_exp.models import get_adapter
from stat_exp.parts import build_parts
from stat_exp.preflight import preflight
from stat_exp.prune.base import Pruner
from stat_exp.prune.budget import BudgetSpec
from stat_exp.prune.calibration_check import overfit_warning
from stat_exp.prune.plan_selection import selects_plan
from stat_exp.prune.none import NoPruner
from stat_exp.prune.runner import PruneRunner
from stat_exp.track.logger import NullLogger, RunLogger, make_logger, run_name
from stat_exp.track.plots import STRUCTURE_PLOT, structure_plot
from stat_exp.track.report import label
from stat_exp.track.results import RunRecord, Timings, config_hash, peak_rss_mb
from stat_exp.track.summary import plan_line

log = logging.getLogger(__name__)


def variant_of(cfg: DictConfig, pruner: Pruner, calibration: Calibration) -> str | None:
    """What distinguishes this job from the default protocol (for tables and plots): the pruner's
    own variant, a non-global allocation (the budget's, or the one the pruner fixes), propagation."""
    allocation = pruner.allocation_under(cfg.budget.allocation)
    propagate = pruner.propagate_under(calibration.propagate)
    parts = [p for p in (pruner.variant, allocation if allocation != "global" else "",
                         f"propagate {propagate}" if propagate != "dense" else "") if p]
    return ", ".join(parts) or None


def pruner_name(cfg: DictConfig) -> str:
    """The name a pruner's records carry (its class's `name`, as in its config file's name), known
    before anything is built, so a job that fails early is listed under it."""
    target = str(OmegaConf.select(cfg, "pruner._target_", default="?"))
    try:
        return str(getattr(get_class(target), "name"))  # AttributeError: not a pruner class
    except Exception:  # noqa: BLE001 - a bad _target_ is reported by the config check
        return target.rsplit(".", 1)[-1]


def run_pipeline(cfg: DictConfig, run_dir: Path, sweep_dir: Path | None = None) -> RunRecord:
    """Run one job and write run_dir/results.json (status failed, with the error, if it fails).

    With `resume=true`, a run_dir whose results.json is ok for the same config hash is not run again:
    its record is returned as it is."""
    run_dir = Path(run_dir)
    record = RunRecord(model=str(OmegaConf.select(cfg, "model.name", default="?")), pruner=pruner_name(cfg))
    try:
        plain = checked_config(cfg)
    except BaseException as e:
        record.status, record.error = "failed", one_line(e)
        record.write(run_dir)
        raise
    record.config_hash, record.seed = config_hash(plain), plain["seed"]
    record.target = {"flops_fraction": plain["budget"]["flops"]}
    if plain["resume"]:
        done = RunRecord.read(run_dir)
        if done is not None and done.status == "ok" and done.config_hash == record.config_hash:
            log.info("resume: %s is done (ok for config %s), not run again", run_dir, record.config_hash)
            return done
    return _run(OmegaConf.create(plain), plain, record, run_dir, sweep_dir)


def _run(cfg: DictConfig, plain: dict, record: RunRecord, run_dir: Path, sweep_dir: Path | None) -> RunRecord:
    """Every part is built from its config before the weights load, so a bad setting fails first."""
    timings = Timings()
    logger: RunLogger = NullLogger(run_dir, plain)
    try:
        with timings("total"):
            record.write(run_dir)
            torch.manual_seed(cfg.seed)
            device = resolve_device(cfg.device)
            parts = build_parts(cfg, device, run_dir)
            preflight(cfg, parts)  # every check that needs no weights
            pruner, backend, calibration = parts.pruner, parts.backend, parts.calibration
            record.pruner, record.variant = pruner.name, variant_of(cfg, pruner, calibration)
            record.factorization = backend.name if backend else None
            logger = make_logger(plain["logger"], run_dir, plain, sweep_dir,
                                 name=run_name(record.model, label(record.to_dict()), cfg.budget.flops))
            if cfg.save_gguf:
                if not cfg.save_model:
                    raise ConfigError(f"save_gguf={cfg.save_gguf} needs save_model=true (the GGUF is written from run_dir/model)")
                check_ready(cfg.save_gguf)
            prunes = pruner.prunes and cfg.budget.flops < 1
            quantized = [cfg.save_gguf] if cfg.save_gguf else []
            quantized += [e.outtype for e in parts.evaluators.values() if isinstance(e, GgufEval)]
            if prunes and (line := width_warning(quantized, cfg.budget.round_to)) is not None:
                log.warning(line)
            plan = make_plan(cfg, parts, device, run_dir, prunes)  # before any weight is read
            record.execution, record.plan = asdict(plan.execution), plan.summary()
            record.tracker = logger.location
            if (line := plan_line(record.plan)) is not None:
                print(line, flush=True)
            work_dir = Path(cfg.execution.dir) if cfg.execution.dir else run_dir / "offload"
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with timings("load"):
                model, tokenizer, store = open_model(cfg.model.source, cfg.model.task, cfg.model.dtype, device,
                                                     plan.execution.offload, work_dir / "blocks", parts.adapter)
            log.info("loaded %s in %.1f s (%s)", cfg.model.source, timings.seconds["load"], plan.execution.describe())
            try:
                adapter = get_adapter(model)
                record.dense_structure = adapter.structure()
                batches, examples = [], None
                held_out: list[dict[str, torch.Tensor]] = []
                needs = pruner.requirements
                if prunes and needs.calibration:
                    with timings("calibrate"):
                        size = plan.calibration
                        if size is None:
                            raise RuntimeError("the plan of a calibrating job has no calibration size")
                        count = calibration.examples_for(tokenizer, size.tokens) if size.auto else None
                        batches = calibration.batches(tokenizer, num_examples=count)
                        if needs.examples:
                            examples = calibration.batches(tokenizer, num_examples=needs.examples)
                        if selects_plan(cfg.budget, pruner):
                            batches, held_out = split_held_out(calibration, tokenizer, batches,
                                                               cfg.budget.held_out_examples)
                    size = replace(size, num_examples=sum(len(b["input_ids"]) for b in batches),
                                   tokens=real_tokens(batches))
                    record.calibration = size.summary()
                    if pruner.corrects and size.warning():  # only a fitted correction can overfit
                        log.warning(size.warning())
                budget = BudgetSpec(cfg.budget.flops if prunes else 1.0, cfg.budget.seq_len,
                                    cfg.budget.allocation, cfg.budget.round_to, cfg.budget.select,
                                    cfg.budget.held_out_examples)
                runner = PruneRunner(pruner if prunes else NoPruner(), budget, backend, calibration.propagate,
                                     cfg.progress, plan.execution.stream, plan.execution.factors, work_dir / "factors")
                outcome = runner.run(model, adapter, batches, device, store, examples, held_out)
                for key, seconds in outcome.timing_s.items():
                    timings.seconds[key] = timings.seconds.get(key, 0.0) + seconds
                record.calibration.update(outcome.diagnostics)
                if overfit_warning(outcome.diagnostics):
                    log.warning(overfit_warning(outcome.diagnostics))
                record.achieved = against_dense(model, adapter, outcome.achieved, budget)
                record.structure, record.allocation = outcome.structure, outcome.allocation
                log.info("pruned: %s", record.achieved)
                store.prepare_for_eval()
                with timings("eval"):
                    record.metrics = evaluate(parts.evaluators, model, tokenizer, device)
                log.info("metrics: %s", record.metrics)
                if cfg.objective is not None and cfg.objective not in record.metrics:
                    raise ConfigError(f"objective={cfg.objective!r} is not among this job's metrics: "
                                      f"{', '.join(record.metrics)}")
                if cfg.save_model:
                    folder = save_pruned(model, tokenizer, run_dir / "model", cfg.model.task)
                    if cfg.save_gguf:
                        export_gguf(folder, run_dir / f"model-{cfg.save_gguf}.gguf", cfg.save_gguf)
                if record.structure != record.dense_structure:
                    structure_plot(record.structure, record.dense_structure, run_dir / STRUCTURE_PLOT,
                                   f"{record.model}, {label(record.to_dict())}")
            finally:
                store.close()
                if device.type == "cuda":
                    record.peak_device_mb = torch.cuda.max_memory_allocated(device) / 2**20
        record.status = "ok"
    except BaseException as e:
        record.status, record.error = "failed", one_line(e)
        raise
    finally:
        record.timing_s, record.peak_rss_mb = timings.seconds, peak_rss_mb()
        path = record.write(run_dir)
        if record.status == "ok":
            logger.log_metrics({**record.metrics, **{f"achieved/{k}": v for k, v in record.achieved.items()},
                                **{f"timing_s/{k}": v for k, v in record.timing_s.items()}})
            logger.log_structure(record.structure)
            if (run_dir / STRUCTURE_PLOT).exists():
                logger.log_image("structure_plot", run_dir / STRUCTURE_PLOT)
        logger.log_file(path)
        logger.finish(record.status, record.error)
    return record


def split_held_out(calibration, tokenizer, batches: list, count: int) -> tuple[list, list]:
    """(calibration batches, held-out batches of about `count` examples that share none with them):
    drawn after the configured examples where the source can (`held_out_batches`), else the last
    batches of the calibration set (then not fitted on), when more batches than that remain."""
    draw = getattr(calibration, "held_out_batches", None)
    if draw is not None:
        return batches, draw(tokenizer, count, sum(len(b["input_ids"]) for b in batches))
    k = -(-count // calibration.batch_size)
    return (batches[:-k], batches[-k:]) if len(batches) > k else (batches, [])


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
