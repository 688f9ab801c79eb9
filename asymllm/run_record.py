"""A run's record, asymllm_run.json: written by `asymllm train` beside the adapter, read by
export and the model cards, so a result can always say what produced it."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
from importlib import metadata

RUN_RECORD = "asymllm_run.json"

PACKAGES = ("asymllm", "torch", "transformers", "peft", "trl", "deepspeed", "accelerate", "datasets", "flash-attn")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the asymllm checkout, with '+dirty' when it has uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def write_run_record(output_dir, adapter_args, model_args, data_args, sft_config, recipe, model_path,
                     resumed_from: str | None = None) -> str | None:
    """asymllm_run.json: everything needed to know what ran (rank 0 writes). A resumed run
    keeps the earlier invocations' commands, commits and versions under earlier_invocations."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    record = {
        "command": sys.argv,
        "recipe": recipe.name,
        "update_rule": recipe.to_update_rule(),
        "seed": sft_config.seed,
        "model_path": model_path,
        "adapter": dataclasses.asdict(adapter_args),
        "model": dataclasses.asdict(model_args),
        "data": dataclasses.asdict(data_args),
        "sft_config": json.loads(sft_config.to_json_string()),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_RECORD)
    if resumed_from:  # keep how the first part was started, not only the resume
        record["resumed_from"] = resumed_from
        record["earlier_invocations"] = _earlier_invocations(path)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    return path


def _earlier_invocations(path: str) -> list[dict]:
    """The invocations recorded in an existing asymllm_run.json, oldest first (empty if none or unreadable)."""
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return []
    summary = {key: previous.get(key) for key in INVOCATION_KEYS}
    return [*previous.get("earlier_invocations", []), summary]


INVOCATION_KEYS = ("started", "command", "git_commit", "world_size", "versions")


def training_lines(run: dict | None) -> list[str]:
    """How a run trained (data, schedule, code), as markdown bullets for a model card."""
    if not run:
        return ["No asymllm_run.json beside the adapter: data and settings unknown."]
    data, sft = run.get("data", {}), run.get("sft_config", {})
    dataset = data.get("dataset") or "asymllm built-in instruction data"
    held_out = data.get("eval_dataset") or ("built-in held-out set" if not data.get("dataset") else
                                            f"{data.get('eval_fraction')} of the training data" if data.get("eval_fraction") else "none")
    steps = f"{sft['max_steps']} steps" if (sft.get("max_steps") or -1) > 0 else f"{sft.get('num_train_epochs')} epochs"
    batch = (sft.get("per_device_train_batch_size") or 0) * (sft.get("gradient_accumulation_steps") or 1) * run.get("world_size", 1)
    return [f"- data: {dataset} (split {data.get('dataset_split')}); held out: {held_out}",
            f"- schedule: {steps}, learning rate {sft.get('learning_rate')}, global batch {batch}, "
            f"max length {sft.get('max_length')}, packing {sft.get('packing')}, {_plural(run.get('world_size', 1), 'process')}"
            + (f", DeepSpeed {os.path.basename(str(sft['deepspeed']))}" if sft.get("deepspeed") else ""),
            f"- code: asymllm {run.get('versions', {}).get('asymllm')}, commit {run.get('git_commit')}"]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def read_json(path: str) -> dict | None:
    """A JSON file of a run folder (the record, metrics.json, trainer_state.json, ...), or None
    when it is missing or unreadable: callers describe what they have."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
