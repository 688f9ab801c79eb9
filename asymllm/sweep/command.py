"""`asymllm sweep`: the command, read top to bottom: parse, (select), run, report."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys

from ..adapters.recipe import Recipe
from ..cli_args import ArgumentParser
from ..data import BUILTIN_DATASET, load_examples, split_heldout
from .cells import Phase, RunSpec, numbers, plan, run_cells
from .compare import SELECT_METRICS, select_learning_rates
from .report import write_all

logger = logging.getLogger("asymllm.sweep")
LAYOUT_FIELDS = ("instruction", "input", "output", "prompt", "completion", "messages", "system")


def parse_args(argv):
    parser = ArgumentParser(prog="asymllm sweep", description="train and evaluate every recipe x rank x learning rate x seed")
    grid = parser.add_argument_group("the grid")
    grid.add_argument("--recipes", help="comma-separated recipe names or aliases, each at every --ranks")
    grid.add_argument("--ranks", default="16", help="comma-separated ranks")
    grid.add_argument("--configs", help="instead of --recipes x --ranks: RECIPE:RANK pairs, e.g. lora:16,asym:16,asym:32")
    grid.add_argument("--learning_rates", help="comma-separated learning rates, e.g. 1e-4,3e-4,1e-3 (default: the training default)")
    grid.add_argument("--seeds", default="0", help="comma-separated seeds (with --select_on: the selection's seeds)")
    grid.add_argument("--alpha_ratio", type=float, default=2.0,
                      help="lora_alpha = ratio x r, so alpha/r is the same at every rank (default 2); ignored when "
                           "the training flags give --lora_alpha")
    select = parser.add_argument_group("choosing the learning rate without the test set")
    select.add_argument("--select_on", choices=["validation"],
                        help="pick each recipe and rank's learning rate on a validation part of the training data, then "
                             "run the picked ones with --final_seeds on the full training data and the held-out set")
    select.add_argument("--select_metric", choices=sorted(SELECT_METRICS), default="loss",
                        help="validation metric to pick by: held-out loss (default) or exact_match")
    select.add_argument("--final_seeds", help="comma-separated seeds of the final runs, e.g. 3,4,5,6,7 (fresh: not --seeds)")
    select.add_argument("--validation_fraction", type=float, default=0.125, help="share of the training data held out for selection (0.125: 60 of the built-in 480)")
    select.add_argument("--validation_seed", type=int, default=0, help="seed of that split (fixed: every cell sees the same one)")
    select.add_argument("--selection_epochs", type=float, help="--num_train_epochs of the selection runs (default: as the final runs)")
    parser.add_argument("--reference", default="lora", help="recipe the others are compared with, seed by seed (default lora)")
    parser.add_argument("--config", help="YAML run configuration passed to every `asymllm train`")
    parser.add_argument("--output", required=True, help="sweep folder (runs, sweep.csv, sweep.md, sweep.png)")
    parser.add_argument("--mmlu", action="store_true", help="also run `asymllm eval mmlu` on each adapter")
    parser.add_argument("--eval_flags", default="", help="extra flags for `asymllm eval alpaca`, e.g. '--limit 60'")
    parser.add_argument("--launcher", default="", help="prefix for training, e.g. 'torchrun --nproc_per_node 8' (default: one process)")
    parser.add_argument("--reuse_without_adapter", action="store_true",
                        help="reuse a finished cell's result.json of the same settings even when its adapter folder is "
                             "gone (pruned, or the sweep resumed on another machine from its result files); "
                             "without it such a cell is trained again. sweep.md counts the cells reused so")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER, help="after `--`: flags for every `asymllm train`")
    args = parser.parse_args(argv)
    args.train_flags = [f for f in args.train_flags if f != "--"]
    check_flags(parser, args)
    args.reference = Recipe.parse(args.reference).name  # results carry canonical names
    return args


def check_flags(parser, args) -> None:
    given = {f.split("=", 1)[0] for f in args.train_flags}
    if bool(args.recipes) == bool(args.configs):
        parser.error("give --recipes (each at every --ranks) or --configs (RECIPE:RANK pairs), one of them")
    if args.learning_rates:
        numbers(args.learning_rates, "--learning_rates", float)
    if args.learning_rates and "--learning_rate" in given:
        parser.error("--learning_rates and a --learning_rate training flag contradict each other; give one")
    if args.select_on and not (args.learning_rates and args.final_seeds):
        parser.error("--select_on validation needs --learning_rates to choose from and --final_seeds for the final runs")
    if args.final_seeds and not args.select_on:
        parser.error("--final_seeds is for --select_on validation (without it, --seeds are the runs)")
    if args.select_on and set(numbers(args.final_seeds, "--final_seeds")) & set(numbers(args.seeds, "--seeds")):
        parser.error("--final_seeds must be fresh: none of them in --seeds (the selection's seeds)")
    if not 0 < args.validation_fraction < 1:
        parser.error(f"--validation_fraction {args.validation_fraction}: must be between 0 and 1")


def main(argv=None) -> list[dict]:
    logging.basicConfig(format="[asymllm sweep] %(message)s", level=logging.INFO)
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if not args.select_on:
        grid = Phase(os.path.join(args.output, "runs"), args.train_flags)
        results = run_cells(plan(args.recipes, args.ranks, args.seeds, args.learning_rates, args.configs), grid, args)
        write_all(args.output, results, args.reference)
        return _done(args, results)
    split = write_validation_split(args)
    metric = SELECT_METRICS[args.select_metric]
    selection_flags = [*args.train_flags, "--dataset", split["train_file"], "--eval_dataset", split["validation_file"]]
    if args.selection_epochs is not None:
        selection_flags += ["--num_train_epochs", f"{args.selection_epochs:g}"]
    selection_phase = Phase(os.path.join(args.output, "selection", "runs"), selection_flags, name="selection",
                            alpaca=metric == "heldout_exact_match", eval_data=split["validation_file"],
                            data_sha256=split["sha256"])
    selection = run_cells(plan(args.recipes, args.ranks, args.seeds, args.learning_rates, args.configs), selection_phase, args)
    chosen = select_learning_rates(selection, metric)
    _write_json(os.path.join(args.output, "selection", "selected.json"),
                {"metric": metric, "selected": [{"recipe": r, "rank": k, "lr": lr} for (r, k), lr in chosen.items()]})
    for (recipe, rank), lr in chosen.items():
        logger.info("selected: %s r=%d lr=%g (best mean validation %s)", recipe, rank, lr, metric)
    final_specs = [RunSpec(recipe, rank, seed, lr) for (recipe, rank), lr in chosen.items()
                   for seed in numbers(args.final_seeds, "--final_seeds")]
    final = run_cells(final_specs, Phase(os.path.join(args.output, "final", "runs"), args.train_flags, name="final"), args)
    write_all(args.output, final, args.reference, selection=selection, chosen=chosen, select_metric=metric, split=split)
    return _done(args, final)


def _done(args, results: list[dict]) -> list[dict]:
    logger.info("table: %s, %s; plot: %s", *(os.path.join(args.output, f) for f in ("sweep.md", "sweep.csv", "sweep.png")))
    return results


def training_source(args) -> tuple[str, str]:
    """(--dataset, --dataset_split) every `asymllm train` of the sweep gets: from the training
    flags (the last one wins, as in argparse), else the --config file, else the built-in data."""
    source, split = None, "train"
    if args.config:
        import yaml

        with open(args.config) as f:
            config = yaml.safe_load(f) or {}
        source, split = config.get("dataset"), config.get("dataset_split", split)
    flags = args.train_flags
    for i, flag in enumerate(flags[:-1]):
        if flag == "--dataset":
            source = flags[i + 1]
        elif flag == "--dataset_split":
            split = flags[i + 1]
    return source or BUILTIN_DATASET, split


def write_validation_split(args) -> dict:
    """The selection's data: the training data split once (fixed seed) into train and
    validation files in the sweep folder, the same for every cell; what it is, in split.json."""
    source, split_name = training_source(args)
    examples, _ = load_examples(source, split=split_name)
    train, validation = split_heldout(examples, args.validation_fraction, seed=args.validation_seed)
    folder = os.path.join(os.path.abspath(args.output), "selection", "data")
    os.makedirs(folder, exist_ok=True)
    files = {"train_file": os.path.join(folder, "train.jsonl"), "validation_file": os.path.join(folder, "validation.jsonl")}
    for key, part in (("train_file", train), ("validation_file", validation)):
        with open(files[key], "w") as f:
            for example in part:  # the chat layout; the record's other fields (e.g. task) kept for per-task scores
                meta = {k: v for k, v in example.meta.items() if k not in LAYOUT_FIELDS}
                f.write(json.dumps({**meta, "messages": example.messages}, ensure_ascii=False) + "\n")
    split = {"source": source, "split": split_name, "seed": args.validation_seed, "fraction": args.validation_fraction,
             "train": len(train), "validation": len(validation), **files,
             "sha256": {key: _sha256(path) for key, path in files.items()}}
    _write_json(os.path.join(folder, "split.json"), split)
    logger.info("selection data: %d validation and %d training examples of %s (seed %d)", len(validation), len(train),
                source, args.validation_seed)
    return split


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
