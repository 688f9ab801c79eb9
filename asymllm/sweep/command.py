"""`asymllm sweep`: the command, read top to bottom: parse, (select), run, report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ..adapters.recipe import Recipe
from ..cli_args import ArgumentParser
from ..data import load_examples, split_heldout
from .cells import Phase, RunSpec, numbers, plan, run_cells
from .compare import SELECT_METRICS, grid_edges, next_rate, select_learning_rates, tried_rates
from .flags import (TrainingData, check_eval_flags, config_file_settings, file_sha256, files_sha256, given_training_settings,
                    jsonl_line, training_data)
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
    grid.add_argument("--alpha_ratio", type=float,
                      help="lora_alpha = ratio x r, so alpha/r is the same at every rank (default 2, unless the training "
                           "flags or the --config file give lora_alpha: then that one value at every rank)")
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
    select.add_argument("--extend_grid", type=int, nargs="?", const=3, default=0, metavar="N",
                        help="when a configuration selects the largest or smallest rate it tried, run the next rate in "
                             "that direction (with the selection's seeds) and select again, up to N more rates each "
                             "(default N: 3); without it, sweep.md flags a choice at the edge of the grid")
    parser.add_argument("--reference", default="lora", help="recipe the others are compared with, seed by seed (default lora)")
    parser.add_argument("--config", help="YAML run configuration passed to every `asymllm train`")
    parser.add_argument("--output", required=True, help="sweep folder (runs, sweep.csv, sweep.md, sweep.png)")
    parser.add_argument("--mmlu", action="store_true", help="also run `asymllm eval mmlu` on each adapter")
    parser.add_argument("--eval_flags", default="", help="extra flags for `asymllm eval alpaca`, e.g. '--limit 60' (not --data "
                        "or --split: the sweep scores the selection on its validation split and the final runs on the "
                        "training flags' held-out set, --eval_dataset/--eval_split/--eval_fraction as for asymllm train)")
    parser.add_argument("--launcher", default="", help="prefix for training, e.g. 'torchrun --nproc_per_node 8' (default: one process)")
    parser.add_argument("--reuse_without_adapter", action="store_true",
                        help="reuse a finished cell's result.json of the same settings even when its adapter folder is "
                             "gone (pruned, or the sweep resumed on another machine from its result files); "
                             "without it such a cell is trained again. sweep.md counts the cells reused so")
    parser.add_argument("--retrain_to_evaluate", action="store_true",
                        help="when changed evaluation settings (--eval_flags, --mmlu, the held-out set) meet finished "
                             "cells whose adapter is gone, train those again to evaluate them (without it the sweep "
                             "lists them and stops before running anything); cells whose adapter is there are only "
                             "evaluated again")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER, help="after `--`: flags for every `asymllm train`")
    args = parser.parse_args(argv)
    args.train_flags = [f for f in args.train_flags if f != "--"]
    args.eval_flag_list = check_eval_flags(args.eval_flags)
    args.given_flags = given_training_settings(args.train_flags)
    args.given = {**config_file_settings(args.config), **args.given_flags}  # the flags win, as in `asymllm train`
    args.files_sha256 = files_sha256({"config": args.config, "dataset": args.given.get("dataset"),
                                      "eval_dataset": args.given.get("eval_dataset")})  # once, not per cell
    check_flags(parser, args)
    args.reference = Recipe.parse(args.reference).name  # results carry canonical names
    return args


def check_flags(parser, args) -> None:
    given = args.given  # what the training flags and the --config file set, parsed as `asymllm train` does
    if bool(args.recipes) == bool(args.configs):
        parser.error("give --recipes (each at every --ranks) or --configs (RECIPE:RANK pairs), one of them")
    if args.learning_rates:
        numbers(args.learning_rates, "--learning_rates", float)
    if args.learning_rates and "learning_rate" in given:
        where = "the --config file's learning_rate" if "learning_rate" not in args.given_flags else "a --learning_rate training flag"
        parser.error(f"--learning_rates and {where} contradict each other; give one")
    if args.alpha_ratio is not None and "lora_alpha" in given:
        parser.error(f"--alpha_ratio {args.alpha_ratio:g} and lora_alpha {given['lora_alpha']:g} (training flags or --config) "
                     "contradict each other: give one (--alpha_ratio: alpha follows the rank; lora_alpha: one value at every rank)")
    if args.alpha_ratio is None and "lora_alpha" not in given:
        args.alpha_ratio = 2.0
    if args.select_on and not (args.learning_rates and args.final_seeds):
        parser.error("--select_on validation needs --learning_rates to choose from and --final_seeds for the final runs")
    if args.final_seeds and not args.select_on:
        parser.error("--final_seeds is for --select_on validation (without it, --seeds are the runs)")
    if args.extend_grid and not args.select_on:
        parser.error("--extend_grid is for --select_on validation (it moves the grid of the selection)")
    if args.extend_grid < 0:
        parser.error(f"--extend_grid {args.extend_grid}: must be a number of rates >= 0")
    if args.select_on and set(numbers(args.final_seeds, "--final_seeds")) & set(numbers(args.seeds, "--seeds")):
        parser.error("--final_seeds must be fresh: none of them in --seeds (the selection's seeds)")
    if not 0 < args.validation_fraction < 1:
        parser.error(f"--validation_fraction {args.validation_fraction}: must be between 0 and 1")


def main(argv=None) -> list[dict]:
    logging.basicConfig(format="[asymllm sweep] %(message)s", level=logging.INFO)
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    data, train_flags = heldout_data(args)
    scored = {"final": scored_file(data.heldout)}
    if not args.select_on:
        grid = Phase(os.path.join(args.output, "runs"), train_flags, eval_data=data.heldout)
        results = run_cells(plan(args.recipes, args.ranks, args.seeds, args.learning_rates, args.configs), grid, args)
        write_all(args.output, results, args.reference, scored_on=scored)
        return _done(args, results)
    split = write_validation_split(args, data)
    scored["selection"] = scored_file(split["validation_file"])
    metric = SELECT_METRICS[args.select_metric]
    selection_flags = [*train_flags, "--dataset", split["train_file"], "--eval_dataset", split["validation_file"]]
    if args.selection_epochs is not None:
        selection_flags += ["--num_train_epochs", f"{args.selection_epochs:g}"]
    selection_phase = Phase(os.path.join(args.output, "selection", "runs"), selection_flags, name="selection",
                            alpaca=metric == "heldout_exact_match", eval_data=split["validation_file"],
                            data_sha256=split["sha256"])
    selection = run_cells(plan(args.recipes, args.ranks, args.seeds, args.learning_rates, args.configs), selection_phase, args)
    selection, chosen = select_with_extensions(selection, selection_phase, metric, args)
    edges = grid_edges(selection, chosen)
    _write_json(os.path.join(args.output, "selection", "selected.json"),
                {"metric": metric, "selected": [{"recipe": r, "rank": k, "lr": lr, "at_grid_edge": edges.get((r, k))}
                                                for (r, k), lr in chosen.items()]})
    for (recipe, rank), lr in chosen.items():
        edge = f" (the {edges[recipe, rank]} rate tried: its best may lie beyond; --extend_grid)" if (recipe, rank) in edges else ""
        logger.info("selected: %s r=%d lr=%g (best mean validation %s)%s", recipe, rank, lr, metric, edge)
    final_specs = [RunSpec(recipe, rank, seed, lr) for (recipe, rank), lr in chosen.items()
                   for seed in numbers(args.final_seeds, "--final_seeds")]
    final_phase = Phase(os.path.join(args.output, "final", "runs"), train_flags, name="final", eval_data=data.heldout)
    final = run_cells(final_specs, final_phase, args)
    write_all(args.output, final, args.reference, selection=selection, chosen=chosen, select_metric=metric, split=split,
              edges=edges, scored_on=scored)
    return _done(args, final)


def select_with_extensions(selection: list[dict], phase: Phase, metric: str, args) -> tuple[list[dict], dict]:
    """Select; then, with --extend_grid, while a choice is the largest (smallest) rate its
    configuration tried, run the next rate up (down) with the selection's seeds and select again."""
    chosen = select_learning_rates(selection, metric)
    for _ in range(args.extend_grid):
        edges = grid_edges(selection, chosen)
        extra = [RunSpec(recipe, rank, seed, next_rate(tried_rates(selection, (recipe, rank)), side))
                 for (recipe, rank), side in edges.items() for seed in numbers(args.seeds, "--seeds")]
        if not extra:
            break
        for (recipe, rank), side in edges.items():
            logger.info("--extend_grid: %s r=%d selected the %s rate tried (%g); trying %g", recipe, rank, side,
                        chosen[recipe, rank], next_rate(tried_rates(selection, (recipe, rank)), side))
        selection = selection + run_cells(extra, phase, args)
        chosen = select_learning_rates(selection, metric)
    return selection, chosen


def _done(args, results: list[dict]) -> list[dict]:
    logger.info("table: %s, %s; plot: %s", *(os.path.join(args.output, f) for f in ("sweep.md", "sweep.csv", "sweep.png")))
    return results


def heldout_data(args) -> tuple[TrainingData, list[str]]:
    """The data every run trains on and is scored on, and the training flags that say so. With
    --eval_fraction the held-out part is split off once (seed 0) into files in the sweep folder,
    so every run, whatever its seed, is scored on the same examples (`asymllm train` alone
    would split by the run's seed) and the selection's validation split comes from the rest."""
    data = training_data(args.given)
    if data.heldout is not None:
        return data, args.train_flags
    examples, _ = load_examples(data.source, split=data.split)
    train, heldout = split_heldout(examples, data.eval_fraction, seed=0)
    folder = os.path.join(os.path.abspath(args.output), "heldout")
    files = write_examples(folder, {"train.jsonl": train, "heldout.jsonl": heldout})
    logger.info("held-out set: %d of the %d examples of %s (--eval_fraction %g, seed 0), the same for every run",
                len(heldout), len(examples), data.source, data.eval_fraction)
    flags = [*args.train_flags, "--dataset", files["train.jsonl"], "--eval_dataset", files["heldout.jsonl"], "--eval_fraction", "0"]
    return TrainingData(files["train.jsonl"], "train", files["heldout.jsonl"], "test", 0.0), flags


def write_validation_split(args, data: TrainingData) -> dict:
    """The selection's data: the training data split once (fixed seed) into train and
    validation files in the sweep folder, the same for every cell; what it is, in split.json."""
    examples, _ = load_examples(data.source, split=data.split)
    train, validation = split_heldout(examples, args.validation_fraction, seed=args.validation_seed)
    folder = os.path.join(os.path.abspath(args.output), "selection", "data")
    written = write_examples(folder, {"train.jsonl": train, "validation.jsonl": validation})
    files = {"train_file": written["train.jsonl"], "validation_file": written["validation.jsonl"]}
    split = {"source": data.source, "split": data.split, "seed": args.validation_seed, "fraction": args.validation_fraction,
             "train": len(train), "validation": len(validation), **files,
             "sha256": {key: file_sha256(path) for key, path in files.items()}}
    _write_json(os.path.join(folder, "split.json"), split)
    logger.info("selection data: %d validation and %d training examples of %s (seed %d)", len(validation), len(train),
                data.source, args.validation_seed)
    return split


def write_examples(folder: str, parts: dict[str, list]) -> dict[str, str]:
    """Each part as chat-layout JSON Lines (the record's other fields, e.g. task, kept for
    per-task scores); file name -> path."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, part in parts.items():
        paths[name] = os.path.join(folder, name)
        with open(paths[name], "w") as f:
            for example in part:
                meta = {k: v for k, v in example.meta.items() if k not in LAYOUT_FIELDS}
                f.write(jsonl_line({**meta, "messages": example.messages}))
    return paths


def scored_file(path: str | None) -> dict:
    return {"file": path, "sha256": file_sha256(path)}


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
