"""What a run leaves behind for people: its resolved configuration and its loss curve."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
from importlib import metadata

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
    path = os.path.join(output_dir, "asymllm_run.json")
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


def plot_loss_curve(log_history: list[dict], path: str) -> str | None:
    """Training loss (and held-out loss where evaluated) against step, as a PNG."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    held_out = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), marker=".", label="train loss")
    if held_out:
        ax.plot(*zip(*held_out), marker="o", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
