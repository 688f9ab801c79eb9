"""What the sweep reads of the training flags (and the --config file), parsed the way `asymllm
train` parses them, and the held-out set its runs are scored on.

One parser, not token matching: `--dataset=PATH` and `--dataset PATH` are the same flag to
`asymllm train`, so they must be to the sweep too (a token match once missed the `=` spelling,
and the selection phase then tuned on the built-in data while the final runs trained on the
user's). The held-out set is the one `asymllm train` would hold out (`--eval_dataset`, the
built-in data's held-out part, or `--eval_fraction` of the training data), and the evaluation
is given it explicitly: `asymllm eval alpaca`'s own default is the built-in held-out set, the
wrong one for a sweep on the user's data.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from dataclasses import dataclass

from ..cli_args import closest
from ..data import BUILTIN_DATASET, BUILTIN_HELDOUT
from ..fingerprint import file_record

# Evaluation flags that choose what is scored: the sweep sets them (per phase), never the user.
SCORED_DATA_FLAGS = {"--data": "--eval_dataset FILE (or --eval_fraction F) among the training flags after --",
                     "--split": "--eval_split NAME among the training flags after --"}


class SweepFlagError(SystemExit):
    """A sweep flag that cannot be used: one line naming it and what to give instead."""

    def __init__(self, message: str):
        super().__init__(f"asymllm sweep: {message}")


def given_training_settings(train_flags: list[str]) -> dict:
    """name -> value of every training setting the flags set, typed as `asymllm train` types them."""
    from trl import TrlParser

    from ..training.config import AdapterArguments, DataArguments, ModelArguments, RunConfig

    if "--config" in train_flags or any(f.startswith("--config=") for f in train_flags):
        raise SweepFlagError("give the run configuration as the sweep's own --config FILE (before --), not among the "
                             "training flags: the sweep reads it too")
    parser = TrlParser((AdapterArguments, ModelArguments, DataArguments, RunConfig), prog="asymllm train")
    for action in parser._actions:  # only what was given comes back
        action.default, action.required = argparse.SUPPRESS, False
    given, unknown = parser.parse_known_args(train_flags)
    unknown = [u.split("=", 1)[0] for u in unknown if u.startswith("--")]
    if unknown:  # said before the first cell, not by its train after minutes of a sweep
        known = [option for action in parser._actions for option in action.option_strings]
        hints = [f"{u} -> {match}" for u in unknown if (match := closest(u, known))]
        raise SweepFlagError(f"unknown training flag{'s' if len(unknown) > 1 else ''} after --: {' '.join(unknown)}"
                             + (f" (did you mean: {', '.join(hints)}?)" if hints else " (asymllm train --help lists them)"))
    return vars(given)


def config_file_settings(config: str | None) -> dict:
    """The --config YAML's settings, checked as `asymllm train` checks them ({} without one)."""
    from ..training.config import ConfigError, read_yaml_config

    try:
        return read_yaml_config(["--config", config]) if config else {}
    except ConfigError as error:
        raise SweepFlagError(str(error)) from None


@dataclass(frozen=True)
class TrainingData:
    """What every run trains on and is scored on, as `asymllm train` resolves it."""

    source: str
    split: str
    heldout: str | None  # --eval_dataset, or the built-in held-out part; None: carve eval_fraction
    heldout_split: str
    eval_fraction: float

    @property
    def builtin(self) -> bool:
        return self.source == BUILTIN_DATASET


def training_data(given: dict) -> TrainingData:
    source = given.get("dataset") or BUILTIN_DATASET
    heldout = given.get("eval_dataset") or (BUILTIN_HELDOUT if not given.get("dataset") else None)
    fraction = float(given.get("eval_fraction") or 0.0)
    if heldout is None and fraction <= 0:
        raise SweepFlagError(f"the runs train on {source}, which has no held-out set to score them on; give one as "
                             "`asymllm train` takes it, among the training flags after --: --eval_dataset FILE "
                             "[--eval_split NAME], or --eval_fraction F (a part of the training data, split once for every run)")
    return TrainingData(source, given.get("dataset_split", "train"), heldout, given.get("eval_split", "test"), fraction)


def check_eval_flags(eval_flags: str) -> list[str]:
    """The --eval_flags as a list; refused when they choose the scored data, which is the
    sweep's to set (appended after the selection's validation file, a --data would win and the
    learning rate would be chosen on whatever it names: the test set, say)."""
    try:
        flags = shlex.split(eval_flags)
    except ValueError as error:
        raise SweepFlagError(f"--eval_flags {eval_flags!r}: {error}") from None
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name in SCORED_DATA_FLAGS:
            raise SweepFlagError(f"--eval_flags {name}: the sweep chooses the scored data itself (the validation split "
                                 f"in selection, the held-out set in the final runs); use {SCORED_DATA_FLAGS[name]}")
    return flags


def file_sha256(path: str | None) -> str | None:
    """The sha256 of a local file's bytes; None for a hub name, a folder or nothing."""
    return file_record(path)["sha256"] if path and os.path.isfile(path) else None


def files_sha256(paths: dict[str, str | None]) -> dict[str, str]:
    """{role: sha256} of the local files among `paths` (a --config YAML, a --dataset file): a
    result is of their content, not of their path. Empty when there are none, as for the built-in
    data (part of the installed asymllm)."""
    return {role: sha for role, path in paths.items() if path and path not in (BUILTIN_DATASET, BUILTIN_HELDOUT)
            and (sha := file_sha256(path))}


def json_value(value):
    """json.dumps' `default` for a record's other fields as parquet and hub data give them
    (datetime, date, bytes, Decimal, numpy scalars): written as text, never a TypeError."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="backslashreplace")
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    return str(value)


def jsonl_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, default=json_value) + "\n"
