"""The planner: peak memory, disk and time of a run, predicted from the model's config alone.

    python -m stat_exp.execution <the same overrides as a run>

The model is built on the meta device (no weights are read); the sizes of everything a run holds
(weights, block-boundary hidden states, statistics, factorizations, activations of one batch,
evaluation logits) follow from its shapes, the calibration size, the pruner's statistics and the
execution choices; every part says its own sizes (the backend its statistics, each offload store
and factors mode its footprint, the evaluators their lengths), so a part of one's own plugs in.
The planner prints a table and, on its last stdout line, one JSON object with
`peak_host_mb`, `peak_device_mb`, `disk_mb`, `seconds` and the throughput it assumed. A run calls
the same code before loading weights: it resolves `execution=auto` choices from it and refuses a
run whose plan does not fit the memory it has, naming predicted and available memory.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from stat_exp.data.calib_size import AUTO, AUTO_MAX_SECONDS, CalibrationSize, auto_examples, knee_tokens, largest_rank
from stat_exp.errors import ConfigError, UserError
from stat_exp.execution.choices import ExecutionSpec, Resolved
from stat_exp.execution.factors import factors_class
from stat_exp.execution.offload import store_class
from stat_exp.execution.requirements import Requirements
from stat_exp.execution.sizes import FLOAT64, MB, BlockSizes, Sizes
from stat_exp.models import AdapterFactory, get_adapter
from stat_exp.models.base import has_token_logits
from stat_exp.models.flops import FlopsModel, shapes_of
from stat_exp.track.markdown import markdown_table

CUDA_CONTEXT_MB = 600.0  # host memory of an initialised CUDA context (torch + cuBLAS), typical
# Assumed dense-matmul throughput (TFLOP/s) per device kind when `plan.tflops` is not set and the
# device cannot be measured here; sustained, not peak.
ASSUMED_TFLOPS = {"cuda": 200.0}


@dataclass(frozen=True)
class Rates:
    """How fast each pruning phase runs, as a share of the dense matmul rate in the model dtype
    (`tflops`): the float32 Gram tiles (full float32, no TF32), the pivoted Cholesky (per m^3 / 3
    flops, whatever the algorithm does), the float64 products of the error curves and the folds;
    and seconds per pivot beyond the flops (kernel launches of the blocked factorization)."""

    gram: float
    factor: float
    float64: float
    pivot_s: float = 0.0


# cpu: fitted on the development machine (2 cores, AMD EPYC): the Gram from calibrate less the
# forward of benchmarks/stat_scale's unloaded 2-block run (docs/large_models.md); the factorization
# from `python -m benchmarks.plan_fit --width 11008 --hidden 4096` (0.16); the float64 products
# (curves, the overfit check, folds) from the prune phase of the 7B-shaped select=off job at commit
# ca27ffc (155 s measured, 123 s planned at 0.5: 0.37, where plan_fit's kernels alone give 0.42-0.46;
# the rest is memory traffic over the 1 GB Grams, which the flops do not count). cuda: assumed
# for an H100 (float32 without TF32 and float64 tensor cores at ~1/4 of the sustained bf16 rate; the
# blocked factorization does 2 m^3 flops at that rate, and ~14 kernel launches per pivot); not
# measured: no GPU was lent so far.
RATES = {"cpu": Rates(gram=0.85, factor=0.16, float64=0.37), "cuda": Rates(gram=0.25, factor=0.04, float64=0.2,
                                                                         pivot_s=7e-5)}
# The throughput a decision that changes results (the `auto` calibration size) assumes unless
# `execution.tflops` declares one: nominal per device kind, never a probe, so a loaded machine
# does not calibrate on fewer tokens than an idle one.
DECISION_TFLOPS = {**ASSUMED_TFLOPS, "cpu": 1.0}
LOGITS_COPIES = 3  # logits, their float32 copy and log-softmax in the perplexity loss


class PlanError(UserError, ValueError):
    """The run would not fit the memory it has."""


@dataclass
class Plan:
    """What a run will hold and how long it will take; peaks in MB."""

    execution: Resolved
    peak_host_mb: float
    peak_device_mb: float
    disk_mb: float
    seconds: float
    tflops: float
    device: str
    rows: list[tuple[str, float]] = field(default_factory=list)  # (what, MB) for the table
    phases: dict[str, float] = field(default_factory=dict)  # seconds of calibrate, factorize, curves, fold, select
    calibration: CalibrationSize | None = None  # the calibration size planned for (`auto` resolved)

    def summary(self) -> dict:
        """The plan as JSON values (a quantity too large to be a finite float is null, never Infinity)."""
        def finite(value: float, digits: int | None = 1) -> float | None:
            return (round(value, digits) if digits else value) if math.isfinite(value) else None

        return {"peak_host_mb": finite(self.peak_host_mb), "peak_device_mb": finite(self.peak_device_mb),
                "disk_mb": finite(self.disk_mb), "seconds": finite(self.seconds), "tflops": finite(self.tflops, None),
                "device": self.device, "phases_s": {k: finite(v) for k, v in self.phases.items()},
                **asdict(self.execution), **({"calibration": self.calibration.summary()} if self.calibration else {})}


class SizedPruner(Protocol):
    """What the planner reads of a pruner (`stat_exp.prune.base.Pruner`)."""

    @property
    def requirements(self) -> Requirements: ...

    def splits_statistics(self, backend: Any) -> bool: ...

    def allocation_under(self, budget_allocation: Any) -> str: ...

    def propagate_under(self, calib_propagate: str) -> str: ...


class SizedBackend(Protocol):
    """What the planner reads of a factorization backend (`stat_exp.factorize.Backend`)."""

    @property
    def holds_activations(self) -> bool: ...

    def statistics_bytes(self, dim: int, tokens: int) -> int: ...


class SizedEvaluator(Protocol):
    """What the planner reads of an evaluator (`stat_exp.eval.base.Evaluator`)."""

    def lengths(self) -> tuple[int, int]: ...


class SizedCalibration(Protocol):
    """What the planner reads of a calibration source."""

    @property
    def num_examples(self) -> int | str: ...  # or "auto"

    @property
    def batch_size(self) -> int: ...

    @property
    def available_examples(self) -> int | None: ...  # a bound on any draw (stat_exp.data.base)


@dataclass
class Job:
    """What the plan of a run depends on (a run's parts reduce to this; no weights)."""

    model: nn.Module  # on the meta device
    pruner: SizedPruner
    backend: SizedBackend | None
    dtype: torch.dtype
    sequences: int
    seq_len: int  # tokens per calibration sequence (an upper bound when padded)
    batch_size: int
    eval_batch: int = 8
    eval_len: int = 256
    propagate: str = "dense"
    allocation: str = "global"  # the effective allocation
    prunes: bool = True
    kept: float = 1.0  # the FLOPs fraction pruning keeps (what a pruned block's rerun costs)
    auto_calibration: bool = False  # calib.num_examples=auto: `sequences` is the knee's, before the planner's bounds
    largest_rank: int = 1  # the most units one correction keeps (stat_exp.data.calib_size)
    available_sequences: int | None = None  # the most examples the calibration source holds (None: unbounded)
    held_out_streams: int = 0  # sequences streamed to choose the global plan (Parts.held_out_streams)
    held_out_examples: int = 0  # held-out examples also run backward, select=output_priced (Parts.held_out_examples)
    held_out_candidates: int = 0  # the plans compared, each folded into a copy of every block (Parts.held_out_candidates)


class RunParts(Protocol):
    """The objects a run builds from its config before any weight loads (`stat_exp.pipeline.Parts`):
    the planner sizes these, it does not build them again."""

    @property
    def pruner(self) -> SizedPruner: ...

    @property
    def backend(self) -> SizedBackend | None: ...

    @property
    def calibration(self) -> SizedCalibration: ...

    @property
    def evaluators(self) -> Mapping[str, SizedEvaluator]: ...

    @property
    def adapter(self) -> AdapterFactory | None: ...

    @property
    def held_out_streams(self) -> int:
        """Sequences streamed block by block to choose the global plan: held-out examples x (candidates + 1)."""
        ...

    @property
    def held_out_examples(self) -> int:
        """The held-out examples (for a model with logits, also run forward and backward to weigh
        each block's output sensitivity)."""
        ...

    @property
    def held_out_candidates(self) -> int:
        """The plans the choice compares (each folded into a copy of every block)."""
        ...


def calibration_length(calibration: SizedCalibration) -> int:
    """Tokens per calibration sequence (an upper bound when examples are padded per batch)."""
    for attr in ("seq_len", "max_length"):
        value = getattr(calibration, attr, None)
        if value:
            return int(value)
    raise ConfigError(f"calibration source {type(calibration).__name__} says no sequence length "
                      f"(a seq_len or max_length attribute) for the planner")


def meta_model(source: str, task: str, dtype: str) -> nn.Module:
    """The model on the meta device: shapes without weights."""
    from transformers import AutoConfig

    from stat_exp.models.checkpoint import model_class
    from stat_exp.models.loading import resolve_source

    try:
        config = AutoConfig.from_pretrained(resolve_source(source))
    except OSError as e:
        raise UserError(f"cannot read the config of model {source!r}: {str(e).splitlines()[0]}") from e
    with torch.device("meta"):
        return model_class(config, task)._from_config(config, dtype=getattr(torch, dtype))


def job_of(model_cfg: Mapping[str, Any], budget_allocation: str, propagate: str, parts: RunParts,
           prunes: bool = True, kept: float = 1.0) -> Job:
    """The Job of a run from its model config and the parts the run built (`kept`: the budget's FLOPs
    fraction; `calib.num_examples=auto`: the knee's count, before `sized_job` bounds it)."""
    model = meta_model(model_cfg["source"], model_cfg["task"], model_cfg["dtype"])
    adapter = get_adapter(model, parts.adapter)  # the configured adapter stays the model's
    calibration, pruner = parts.calibration, parts.pruner
    eval_batch, eval_len = max((e.lengths() for e in parts.evaluators.values()), key=lambda bl: bl[0] * bl[1], default=(8, 256))
    seq_len, auto = calibration_length(calibration), calibration.num_examples == AUTO
    rank = largest_rank(shapes_of(adapter))
    sequences = math.ceil(knee_tokens(rank) / seq_len) if auto else int(calibration.num_examples)
    available = calibration.available_examples
    return Job(model=model, pruner=pruner, backend=parts.backend, dtype=getattr(torch, model_cfg["dtype"]),
               sequences=sequences if available is None else min(sequences, available),
               seq_len=seq_len, batch_size=int(calibration.batch_size), eval_batch=eval_batch, eval_len=eval_len,
               propagate=pruner.propagate_under(propagate), allocation=pruner.allocation_under(budget_allocation),
               prunes=prunes, kept=kept, auto_calibration=auto, largest_rank=rank, available_sequences=available,
               held_out_streams=parts.held_out_streams, held_out_examples=parts.held_out_examples,
               held_out_candidates=parts.held_out_candidates)


def plan_sizes(job: Job) -> Sizes:
    """Sizes of what a run holds, from shapes only."""
    model, pruner, backend = job.model, job.pruner, job.backend
    adapter = get_adapter(model)
    elem = torch.finfo(job.dtype).bits // 8
    tokens = job.sequences * job.seq_len
    block_params = {id(p) for layer in adapter.layers() for p in layer.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in block_params) * elem
    shapes = shapes_of(adapter)
    blocks, steps = [], 0
    gram_flops = factor_flops = curve_flops = fold_flops = down_flops = 0.0
    for layer, sh in zip(adapter.layers(), shapes):
        weights = sum(p.numel() for p in layer.parameters()) * elem
        d_attn, d_ffn = sh.num_heads * sh.head_dim, sh.ffn_width
        stats = heavy = work = 0
        if pruner.requirements.factorization and backend is not None:
            parts = 2 if pruner.splits_statistics(backend) else 1  # fit and held-out statistics
            stats = (backend.statistics_bytes(d_attn, tokens) + backend.statistics_bytes(d_ffn, tokens)) * parts
            heavy = (d_attn * d_attn + d_ffn * d_ffn) * FLOAT64  # R factors
            # scoring the FFN: the weighted Gram and the factor beside the statistics, and V R^T
            work = 2 * d_ffn * d_ffn * FLOAT64 + 2 * sh.hidden * d_ffn * FLOAT64
            gram_flops += tokens * (d_attn ** 2 + d_ffn ** 2)  # tiles cover ~half of each product, x2 flops
            factor_flops += (d_attn ** 3 + d_ffn ** 3) / 3
            curve_flops += sh.hidden * (d_attn ** 2 + d_ffn ** 2)
            if parts == 2:  # the FFN's held-out curve: the fit's factor, a full and a third of a
                # triangular solve, U and the upper blocks of U U^T (correction.error_curve)
                curve_flops += 5 * d_ffn ** 3 / 3 + 2 * sh.hidden * d_ffn ** 2
                # its working set: the two parts' Grams, the ordered copy, the scoring's factor, and
                # the fit Gram's factor (its lift is added in place: 5 m x m, measured on 7B shapes)
                work = max(work, 5 * d_ffn * d_ffn * FLOAT64 + 2 * sh.hidden * d_ffn * FLOAT64)
            fold_flops += sum(d ** 3 / 8 + sh.hidden * d ** 2 / 2 for d in (d_attn, d_ffn))
            steps += d_attn + d_ffn
        down_flops += 2 * tokens * sh.hidden * d_ffn
        if pruner.requirements.moments:
            stats += 2 * (d_attn + d_ffn) * FLOAT64
        inner = max(d_ffn * sh.ffn_matrices, 4 * sh.hidden + 2 * d_attn)  # gate, up, product / q, k, v, o
        acts = job.batch_size * job.seq_len * (inner * elem + 4 * max(d_ffn, d_attn))  # + float32 copy
        blocks.append(BlockSizes(weights, stats, work, heavy, acts))
    causal = hasattr(model, "lm_head") or getattr(model.config, "is_decoder", False)
    vocab = getattr(model.config, "vocab_size", 0) if causal else 0
    flops = FlopsModel(job.seq_len)
    streams = job.held_out_streams  # the dense model's and every candidate's
    sequence = job.seq_len * adapter.hidden_size * elem  # one held-out sequence at a block boundary
    # the output sensitivity (models with logits), before the streams: every boundary kept and one
    # gradient per sequence; a forward pass, then each block run again and back to its input (~3 forwards)
    weighed = job.held_out_examples if has_token_logits(model) else 0
    boundaries = (len(blocks) + 2) * weighed * sequence
    selection = max(streams * sequence, boundaries) + max(b.weights for b in blocks) if streams else 0
    return Sizes(blocks=blocks, rest_weights=rest, hidden=tokens * adapter.hidden_size * elem,
                 eval_work=job.eval_batch * job.eval_len * vocab * 4 * LOGITS_COPIES, tokens=tokens,
                 calibration_flops=job.sequences * sum(flops.dense(sh) for sh in shapes),
                 down_flops=down_flops, gram_flops=gram_flops, factor_flops=factor_flops, curve_flops=curve_flops,
                 fold_flops=fold_flops, pivot_steps=steps, selection=selection,
                 selection_flops=(streams + 3 * weighed) * sum(flops.dense(sh) for sh in shapes),
                 selection_folds=job.held_out_candidates)


def measured_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul throughput of this machine in the model dtype (a ~1 s probe on the CPU)."""
    if device.type != "cpu":
        return ASSUMED_TFLOPS.get(device.type, 100.0)
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < 0.5:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def free_memory_mb(device: torch.device, declared_device_mb: float | None = None) -> tuple[float, float]:
    """(host MB, device MB) a run may plan with: the host's physical memory (not what happens to be
    free at this moment: the same config must make the same choices on the same machine), and the
    device's free memory (another process may hold part of a GPU). On the CPU both are the host's.
    Planning for a GPU this machine does not have needs the device's memory declared."""
    host = _mem_total_mb()
    if device.type == "cpu":
        return host, host
    if declared_device_mb is not None:
        return host, declared_device_mb
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"planning for device={device} without one here: declare its memory with "
                          f"execution.device_memory_mb=<MB>")
    free, _ = torch.cuda.mem_get_info(device)
    return host, free / MB


def _mem_total_mb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MB


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux), else its peak so far."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    from stat_exp.track.results import peak_rss_mb

    return peak_rss_mb()


def make_plan(cfg: Mapping[str, Any], parts: RunParts, device: torch.device, run_dir: Path | None = None,
              prunes: bool = True) -> Plan:
    """The plan of a composed run config on `device`, sizing the parts the run built (see `plan_job`),
    `calib.num_examples=auto` resolved (see `sized_job`)."""
    job = job_of(cfg["model"], cfg["budget"]["allocation"], cfg["calib"].get("propagate", "dense"), parts, prunes,
                 kept=float(cfg["budget"]["flops"]))
    job, spec, size = sized_job(job, ExecutionSpec(**cfg.get("execution", {})), device, run_dir)
    return plan_job(job, spec, device, run_dir, size)


def sized_job(job: Job, spec: ExecutionSpec, device: torch.device, run_dir: Path | None = None
              ) -> tuple[Job, ExecutionSpec, CalibrationSize]:
    """The job with its calibration size settled: an explicit count as it is; `auto` at the knee, or
    the largest count the source holds whose plan fits the memory and `AUTO_MAX_SECONDS` of pruning
    time predicted at `DECISION_TFLOPS` (or the declared `execution.tflops`)."""
    if not (job.auto_calibration and job.prunes):
        return job, spec, CalibrationSize(job.sequences, job.sequences * job.seq_len, job.largest_rank,
                                          job.auto_calibration)
    nominal = replace(spec, tflops=spec.tflops or DECISION_TFLOPS.get(device.type, 100.0))

    def exceeds(sequences: int) -> str | None:
        if job.available_sequences is not None and sequences > job.available_sequences:
            return "data"
        try:
            plan = plan_job(replace(job, sequences=sequences), nominal, device, run_dir)
        except PlanError:
            return "memory"
        return "time" if plan.seconds > AUTO_MAX_SECONDS else None

    size = auto_examples(job.largest_rank, job.seq_len, exceeds)
    return replace(job, sequences=size.num_examples), spec, size


def plan_job(job: Job, spec: ExecutionSpec, device: torch.device, run_dir: Path | None = None,
             size: CalibrationSize | None = None) -> Plan:
    """The plan of `job` on `device`, `execution=auto` choices resolved; raises PlanError when the
    run would not fit the memory it may use. `size`: the calibration size it records."""
    sizes = plan_sizes(job)
    host_free, device_free = free_memory_mb(device, spec.device_memory_mb)
    host_limit = spec.host_memory_mb or host_free
    device_limit = (spec.device_memory_mb or device_free) if device.type != "cpu" else host_limit
    folder = Path(spec.dir) if spec.dir else (Path(run_dir) / "offload" if run_dir else Path.cwd())
    disk_free = shutil.disk_usage(_existing_parent(folder)).free / MB
    holds_activations = bool(job.backend and job.backend.holds_activations)
    resolved = spec.resolve(sizes, device, host_limit, device_limit, disk_free,
                            must_stream_blocks=holds_activations or job.propagate != "dense",
                            needs_whole_model=job.pruner.requirements.whole_model)
    plan = _estimate(sizes, resolved, device, job.prunes, spec.tflops or measured_tflops(device, job.dtype),
                     global_allocation=job.allocation == "global", propagate=job.propagate, kept=job.kept)
    if plan.peak_host_mb > host_limit:
        raise PlanError(f"the plan needs {plan.peak_host_mb:,.0f} MB of host memory, {host_limit:,.0f} MB are available "
                        f"(execution: {resolved.describe()}); try execution.offload=disk or fewer calib.num_examples")
    if device.type != "cpu" and plan.peak_device_mb > device_limit:
        raise PlanError(f"the plan needs {plan.peak_device_mb:,.0f} MB of {device} memory, {device_limit:,.0f} MB are "
                        f"available (execution: {resolved.describe()}); try execution.offload=cpu, "
                        f"execution.factors=spill or a smaller calib.batch_size")
    plan.calibration = size
    return plan


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _estimate(s: Sizes, ex: Resolved, device: torch.device, prunes: bool, tflops: float,
              global_allocation: bool, propagate: str = "dense", kept: float = 1.0) -> Plan:
    """Peaks are the largest sum of what coexists at any step; everything is on the host when the
    device is the CPU."""
    on_cpu = device.type == "cpu"
    baseline = (current_rss_mb() + (0 if on_cpu else CUDA_CONTEXT_MB)) * MB
    blocks = s.blocks
    biggest = max(blocks, key=lambda b: b.weights)
    store, factors = store_class(ex.offload), factors_class(ex.factors)
    weights = store.footprint(s, on_cpu)
    resident, host_weights = weights.device, weights.host  # weights on the device, on the host
    hidden = 2 * s.hidden if ex.stream == "block" else 0  # one boundary in, one out
    waiting = factors.footprint(s)
    held = waiting.device if (prunes and global_allocation) else 0
    work = 0
    if prunes:
        if ex.stream == "model":
            work = sum(b.stats for b in blocks) + max(b.score_work for b in blocks) + biggest.activations
        else:
            work = max(b.stats + b.score_work + b.activations for b in blocks)
        work += held + (s.selection if global_allocation else 0)
    device_peak: float = resident + max(work, s.eval_work) + (hidden if store.resident else 0)
    host_hidden = hidden if (not store.resident or on_cpu) else 0
    if on_cpu:
        host_peak = baseline + host_weights + max(work + hidden, s.eval_work)
        device_peak = host_peak
    else:
        host_peak = baseline + host_weights + host_hidden
    disk = float(weights.disk) + (waiting.disk if prunes else 0)
    phases = _phase_seconds(s, RATES.get(device.type, RATES["cuda"]), tflops * 1e12, factors.second_pass,
                            global_allocation, propagate, kept) if prunes else {}
    rows = [("weights on the device" if not on_cpu else "weights", resident / MB),
            ("block-boundary hidden states", hidden / MB),
            ("statistics (all blocks)" if ex.stream == "model" else "statistics (one block)",
             (sum(b.stats for b in blocks) if ex.stream == "model" else max(b.stats for b in blocks)) / MB if prunes else 0.0),
            ("factorizations held for the allocation", held / MB),
            ("choosing the plan: held-out streams (or boundaries) and a block copy", (s.selection if global_allocation else 0) / MB),
            ("evaluation logits", s.eval_work / MB)]
    return Plan(ex, host_peak / MB, device_peak / MB, disk / MB, sum(phases.values()), round(tflops, 3), str(device),
                rows, phases)


def _phase_seconds(s: Sizes, r: Rates, rate: float, recompute: bool, global_allocation: bool, propagate: str,
                   kept: float) -> dict[str, float]:
    """Seconds of each phase: `calibrate` (blocks forward and the Gram tiles: what a run records as
    calibrate), `factorize`, `curves` and `fold` (together what it records as prune). Passes follow
    the runner: a global allocation with `factors=recompute` streams twice; `propagate=pruned`
    runs each block's statistics up to the down projection and the pruned block once for its
    outputs, after a dense pricing pass under a global allocation (whose second pass has no curves;
    with `factors=recompute`, choosing the plan scores the dense pass once more), and `select`
    where a global plan is chosen on held-out batches: their streams, and every candidate's folds
    (each candidate prunes a copy of every block: measured 100-110 s on 7B-shaped blocks, which the
    streams alone priced at 53-67 s)."""
    phases = _pass_seconds(s, r, rate, recompute, global_allocation, propagate, kept)
    if global_allocation and s.selection_flops:
        phases["select"] = s.selection_flops / rate + s.selection_folds * phases["fold"]
    return phases


def _pass_seconds(s: Sizes, r: Rates, rate: float, recompute: bool, global_allocation: bool, propagate: str,
                  kept: float) -> dict[str, float]:
    stream, gram = s.calibration_flops / rate, s.gram_flops / (rate * r.gram)
    factor = s.factor_flops / (rate * r.factor) + s.pivot_steps * r.pivot_s
    curves, fold = s.curve_flops / (rate * r.float64), s.fold_flops / (rate * r.float64)
    if propagate == "pruned":
        pruned_stream = (s.calibration_flops - s.down_flops + kept * s.calibration_flops) / rate + gram
        if global_allocation:
            dense = 2 if recompute and s.selection_flops else 1
            return {"calibrate": dense * (stream + gram) + pruned_stream, "factorize": (dense + 1) * factor,
                    "curves": dense * curves, "fold": fold}
        return {"calibrate": pruned_stream, "factorize": factor, "curves": curves, "fold": fold}
    passes = 2 if recompute and global_allocation else 1
    return {"calibrate": passes * (stream + gram), "factorize": passes * factor, "curves": passes * curves,
            "fold": fold}


def render(plan: Plan) -> str:
    rows = [(what, f"{mb:,.0f}") for what, mb in plan.rows]
    if plan.calibration:
        c = plan.calibration
        rows.append((f"calibration ({'auto' + (f', capped by {c.capped_by}' if c.capped_by else '') if c.auto else 'set'})",
                     f"{c.num_examples:,} x {c.tokens // max(c.num_examples, 1):,} tokens, "
                     f"{c.tokens_per_unit:.1f} per unit of rank {c.largest_rank:,}"))
    rows += [("peak host memory", f"{plan.peak_host_mb:,.0f}"), ("peak device memory", f"{plan.peak_device_mb:,.0f}"),
             ("disk", f"{plan.disk_mb:,.0f}"), (f"pruning time at {plan.tflops:g} TFLOP/s", f"{plan.seconds:,.0f} s")]
    rows += [(f"of which {phase}", f"{seconds:,.0f} s") for phase, seconds in plan.phases.items()]
    return markdown_table([f"plan ({plan.device}; {plan.execution.describe()})", "MB"], rows)
