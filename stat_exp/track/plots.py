"""Figures a person reads at a glance: a metric against achieved FLOPs (reports), and what one run
kept in every layer (beside its results.json)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

DENSE = "none"  # the pruner name of the unpruned reference
STRUCTURE_PLOT = "structure.png"
# How the last part of a metric's name ends or starts -> what its axis says (unit, which way is better).
_ENDS = (("ppl", "perplexity (lower is better)"), ("perplexity", "perplexity (lower is better)"),
         ("tokens_per_s", "tokens per second (higher is better)"), ("_ms", "milliseconds (lower is better)"),
         ("_s", "seconds (lower is better)"), ("drift", "drift from the dense model (lower is better)"))
_STARTS = (("acc", "accuracy (higher is better)"), ("f1", "F1 (higher is better)"),
           ("exact", "exact match (higher is better)"), ("mcc", "Matthews correlation (higher is better)"))


def axis_label(metric: str) -> str:
    """`perplexity/ppl` -> "perplexity/ppl: perplexity (lower is better)"; unknown kinds stay as named."""
    last = metric.lower().rsplit("/", 1)[-1]
    unit = next((text for end, text in _ENDS if last.endswith(end)), None) or next(
        (text for start, text in _STARTS if last.startswith(start)), None)
    return f"{metric}: {unit}" if unit else metric


def wants_log_scale(metric: str, values: Sequence[float]) -> bool:
    """Perplexities, and any positive metric spanning an order of magnitude or more."""
    positive = [v for v in values if v > 0]
    if not positive or len(positive) < len(values):
        return False
    return "ppl" in metric.lower() or "perplexity" in metric.lower() or max(positive) >= 10 * min(positive)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_plot(df: pd.DataFrame, metric: str, path: Path) -> None:
    """The metric against achieved FLOPs, one line per pruner (and model, when several), the dense
    model as a dashed reference line."""
    plt = _pyplot()
    from matplotlib.ticker import LogFormatter

    ok = df[(df["status"] == "ok") & df[metric].notna()]
    several_models = ok["model"].nunique() > 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (pruner, model), group in ok.groupby(["pruner", "model"], sort=True):
        name = "dense" if pruner == DENSE else pruner
        name = f"{name} [{model}]" if several_models else name
        if pruner == DENSE:
            ax.axhline(group[metric].mean(), linestyle="--", color="gray", label=name)
        else:
            group = group.sort_values("achieved_flops")
            ax.plot(group["achieved_flops"], group[metric], marker="o", label=name)
    if wants_log_scale(metric, list(ok[metric])):
        ax.set_yscale("log")
        # Plain numbers (20, 30, 40) read better than 2x10^1 on the short ranges of perplexity.
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set_xlabel("achieved FLOPs (fraction of the dense model's prunable FLOPs)")
    ax.set_ylabel(axis_label(metric))
    ax.set_title(f"{metric} against kept FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def structure_plot(structure: Mapping[str, Sequence[int]], dense: Mapping[str, Sequence[int]], path: Path,
                   title: str = "") -> None:
    """Heads and FFN neurons kept in every layer, as bars over the dense model's counts."""
    plt = _pyplot()
    kinds = [k for k in ("heads", "neurons") if structure.get(k) and dense.get(k)]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(6.0, 0.25 * len(dense[kinds[0]]) + 2), 2.6 * len(kinds)),
                             sharex=True, squeeze=False)
    removed = set(structure.get("removed_blocks") or [])  # whole blocks a pruner dropped (block_drop)
    for ax, kind in zip(axes[:, 0], kinds):
        layers = range(len(dense[kind]))
        kept_counts = dict(zip([i for i in layers if i not in removed], structure[kind]))
        ax.bar(layers, dense[kind], color="lightgray", label="dense")
        ax.bar(layers, [kept_counts.get(i, 0) for i in layers], color="tab:blue", label="kept")
        kept, total = sum(structure[kind]), sum(dense[kind])
        ax.set_ylabel(f"{kind} per layer")
        ax.set_title(f"{kind}: {kept} of {total} kept ({kept / total:.0%})", fontsize="medium", loc="left")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("layer")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
