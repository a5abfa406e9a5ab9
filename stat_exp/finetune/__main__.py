"""`python -m stat_exp.finetune --model minilm_l6 --task pang_lee --out DIR` (also `stat-exp-finetune`):
the command line of `stat_exp.finetune.classifier`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stat_exp.data.glue import TASKS
from stat_exp.data.text import DataError
from stat_exp.device import resolve_device
from stat_exp.errors import UserError
from stat_exp.finetune.classifier import POLARITY_MODEL, Recipe, finetune, polarity_model_path

DESCRIPTION = "Turn an encoder into a task model (fine-tune it on a GLUE-style task)."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Recipe()
    p = argparse.ArgumentParser(prog="stat-exp-finetune", description=DESCRIPTION)
    p.add_argument("--model", default=d.model, help="embedded name, local folder or hub id")
    p.add_argument("--task", default=d.task, choices=sorted(TASKS))
    p.add_argument("--data-dir", default=None, help="folder with train/validation .jsonl or .tsv (else hub/embedded)")
    p.add_argument("--out", type=Path, help=f"output folder (default: the cache's models/{POLARITY_MODEL} for "
                                             "the default model and task)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=float, default=d.warmup)
    p.add_argument("--train-embeddings", action="store_true", help="also update the word embeddings")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = Recipe(model=args.model, task=args.task, data_dir=args.data_dir, epochs=args.epochs, lr=args.lr,
                    batch_size=args.batch_size, max_length=args.max_length, weight_decay=args.weight_decay,
                    warmup=args.warmup, freeze_embeddings=not args.train_embeddings, seed=args.seed)
    out = args.out
    if out is None:
        if (recipe.model, recipe.task) != (Recipe.model, Recipe.task):
            print("error: --out is required unless the default model and task are used", file=sys.stderr)
            sys.exit(2)
        out = polarity_model_path()
    try:
        metrics = finetune(recipe, out, resolve_device(args.device), overwrite=args.overwrite)
    except (UserError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"out": str(out), **metrics}, indent=1))


if __name__ == "__main__":
    main()
