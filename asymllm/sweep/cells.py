"""One sweep cell: a recipe x rank x learning rate x seed trained and evaluated by the normal
`asymllm train` and `asymllm eval` commands, each its own process, with its result.json.

A finished cell leaves `result.json` in its folder with the settings it ran with and the
fingerprint of the adapter it evaluated (asymllm/fingerprint.py). It is reused only while
both still hold: changed settings retrain it (--overwrite_output_dir), a changed adapter is
evaluated again, a missing adapter is trained again. So a stopped sweep resumes, and a
changed command never reuses a number from another setting.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from ..adapters.recipe import Recipe
from ..fingerprint import adapter_fingerprint, fingerprint_changes

logger = logging.getLogger("asymllm.sweep")
# A result.json of the same settings whose adapter is gone: pruned for disk, or a sweep resumed
# elsewhere from its committed result files. Reused only when the user says so.
ADAPTER_GONE = "result.json is there but its adapter"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class RunSpec:
    recipe: str  # canonical name
    rank: int
    seed: int
    lr: float | None = None  # None: the training default (or the flags' --learning_rate)

    @property
    def name(self) -> str:
        rate = f"-lr{self.lr:g}" if self.lr is not None else ""
        return f"{self.recipe}-r{self.rank}{rate}-s{self.seed}"


def plan(recipes: str | None, ranks: str, seeds: str, learning_rates: str | None = None,
         configs: str | None = None) -> list[RunSpec]:
    """Every recipe x rank (or each of `configs`, recipe:rank pairs) x learning rate x seed,
    in that nesting order."""
    rates = numbers(learning_rates, "--learning_rates", float) if learning_rates else [None]
    pairs = recipe_ranks(configs) if configs else [
        (Recipe.parse(r.strip()).name, rank) for r in recipes.split(",") if r.strip() for rank in numbers(ranks, "--ranks", int)]
    return [RunSpec(name, rank, s, lr) for name, rank in pairs for lr in rates for s in numbers(seeds, "--seeds", int)]


def recipe_ranks(configs: str) -> list[tuple[str, int]]:
    """'lora:16,asym:32' -> [('hA_he_hB_zero', 16), ('A_rand_hB_zero', 32)]."""
    pairs = []
    for item in (c.strip() for c in configs.split(",") if c.strip()):
        recipe, _, rank = item.rpartition(":")
        if not recipe or not rank.isdigit() or int(rank) < 1:
            raise SystemExit(f"asymllm sweep: --configs {item!r}: expected RECIPE:RANK, e.g. lora:16,asym:32")
        pairs.append((Recipe.parse(recipe).name, int(rank)))
    return pairs


def numbers(text: str, flag: str, kind=int) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or (kind is float and any(v <= 0 for v in values)):
        expected = "comma-separated integers" if kind is int else "comma-separated positive numbers, e.g. 1e-4,3e-4"
        raise SystemExit(f"asymllm sweep: {flag} {text!r}: expected {expected}")
    return values


@dataclass
class Phase:
    """How every cell of one phase runs: where, with which extra training flags, evaluated how."""

    runs_dir: str
    train_flags: list[str]  # the user's, then the phase's own (which win)
    alpaca: bool = True
    eval_data: str | None = None  # --data for `asymllm eval alpaca`; None: its default (the held-out set)
    name: str = "grid"  # grid (no selection), selection or final
    data_sha256: dict | None = None  # the selection's split files: changed content is another setting


def run_cells(specs: list[RunSpec], phase: Phase, args) -> list[dict]:
    results = []
    for index, spec in enumerate(specs, 1):
        run_dir = os.path.join(phase.runs_dir, spec.name)
        where = ("" if phase.name == "grid" else phase.name + " ") + f"[{index}/{len(specs)}] {spec.name}"
        settings = cell_settings(spec, phase, args)
        done = load_result(run_dir)
        stale = None if done is None else stale_reason(done, run_dir, settings)
        if done is not None and stale is None:
            logger.info("%s: done already, skipped", where)
        elif done is not None and stale.startswith(ADAPTER_GONE) and args.reuse_without_adapter:
            logger.info("%s: done already (its adapter is not here; result.json reused: --reuse_without_adapter)", where)
            done = {**done, "reused_without_adapter": True}
        elif done is not None and stale.startswith("the adapter changed") and os.path.isdir(adapter_dir(run_dir)):
            logger.info("%s: %s; re-evaluating", where, stale)
            done = run_one(spec, run_dir, phase, args, settings, train=False, discard_evaluations=True)
        else:
            logger.info("%s: training%s", where, f" ({stale})" if stale else "")
            done = run_one(spec, run_dir, phase, args, settings, fresh=stale is not None)
        results.append({**done, "phase": phase.name})
    return results


def lora_alpha(spec: RunSpec, args) -> float | None:
    """alpha = alpha_ratio x r (the scale alpha/r the same at every rank), unless the flags give one."""
    if args.alpha_ratio is None or "--lora_alpha" in {f.split("=", 1)[0] for f in args.train_flags}:
        return None
    return args.alpha_ratio * spec.rank


def cell_settings(spec: RunSpec, phase: Phase, args) -> dict:
    """What a cell's numbers depend on besides its adapter; output paths made relative, so a
    moved sweep folder is still the same sweep."""
    root = os.path.abspath(args.output)

    def relative(flag: str) -> str:
        return os.path.relpath(flag, root) if os.path.isabs(flag) and flag.startswith(root + os.sep) else flag
    return {"run": asdict(spec), "lora_alpha": lora_alpha(spec, args), "config": args.config,
            "train_flags": [relative(f) for f in phase.train_flags], "data_sha256": phase.data_sha256,
            "eval": {"alpaca": phase.alpaca, "data": phase.eval_data and relative(phase.eval_data),
                     "eval_flags": args.eval_flags, "mmlu": args.mmlu}}


def load_result(run_dir: str) -> dict | None:
    """The cell's result.json, or None: not there, or unreadable (then the cell runs again)."""
    path = os.path.join(run_dir, "result.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        logger.warning("%s is unreadable (%s): the cell runs again", path, error)
        return None


def write_result(run_dir: str, result: dict) -> None:
    """Whole or not at all: a sweep killed mid-write must not leave a half file behind."""
    path = os.path.join(run_dir, "result.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


def stale_reason(result: dict, run_dir: str, settings: dict) -> str | None:
    """Why `result` (a cell's result.json) cannot be reused, or None: it must be of these
    settings, and of the adapter now in the cell's folder, not merely of the same path."""
    recorded = result.get("settings")
    if recorded != settings:
        changed = sorted(k for k in settings if (recorded or {}).get(k) != settings[k])
        return f"its settings changed ({', '.join(changed)})" if recorded else "result.json records no settings (an older asymllm wrote it)"
    adapter = adapter_dir(run_dir)
    if not os.path.isdir(adapter):
        return f"{ADAPTER_GONE} {adapter} is not"
    fingerprint = result.get("adapter_fingerprint")
    if fingerprint is None:
        return "result.json records no adapter fingerprint (an older asymllm wrote it)"
    changes = fingerprint_changes({"adapter": fingerprint}, {"adapter": adapter_fingerprint(adapter)})
    return f"the adapter changed since result.json was written ({changes['adapter']})" if changes else None


def adapter_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "train", "adapter")


def run_one(spec: RunSpec, run_dir: str, phase: Phase, args, settings: dict, train: bool = True,
            fresh: bool = False, discard_evaluations: bool = False) -> dict:
    """Train (unless `train` is False) and evaluate one cell. `fresh`: the cell's old run is of
    other settings, so training starts over (--overwrite_output_dir) and its evaluations go;
    otherwise an interrupted training or evaluation resumes."""
    start = time.perf_counter()
    train_dir, eval_dir = os.path.join(run_dir, "train"), os.path.join(run_dir, "eval")
    if train:
        command = [*_entry(args.launcher, "train"), "--recipe", spec.recipe, "--lora_r", str(spec.rank),
                   "--seed", str(spec.seed), "--output_dir", train_dir,
                   *(["--overwrite_output_dir"] if fresh else ["--resume_from_checkpoint", "auto"])]
        if spec.lr is not None:
            command += ["--learning_rate", f"{spec.lr:g}"]
        if settings["lora_alpha"] is not None:
            command += ["--lora_alpha", f"{settings['lora_alpha']:g}"]
        if args.config:
            command += ["--config", args.config]
        _run(command + phase.train_flags, run_dir, "train")
    adapter = adapter_dir(run_dir)
    evaluated = adapter_fingerprint(adapter)  # taken before evaluating: what the evaluations are given
    overwrite = ["--overwrite"] if (discard_evaluations or fresh) else []
    if phase.alpaca:
        data = ["--data", phase.eval_data] if phase.eval_data else []
        _run([*_entry("", "eval"), "alpaca", "--adapter", adapter, "--output_dir", eval_dir, *data, *overwrite,
              *shlex.split(args.eval_flags)], run_dir, "eval_alpaca")
    if args.mmlu:
        _run([*_entry("", "eval"), "mmlu", "--adapter", adapter, "--output_dir", eval_dir, *overwrite], run_dir, "eval_mmlu")
    result = {**collect(spec, train_dir, eval_dir, time.perf_counter() - start), "lora_alpha": settings["lora_alpha"],
              "adapter_fingerprint": evaluated, "settings": settings}
    write_result(run_dir, result)
    return result


def _entry(launcher: str, command: str) -> list[str]:
    """`asymllm <command>` as this interpreter runs it; training under a launcher uses launch/sft.py."""
    if launcher and command == "train":
        return [*shlex.split(launcher), os.path.join(ROOT, "launch", "sft.py")]
    return [sys.executable, "-m", "asymllm.cli", command]


def _run(command: list[str], run_dir: str, label: str) -> None:
    """Run one step, its output to a log file in the run folder; a failure names the log."""
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, f"{label}.log")
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        with open(log_path) as log:
            tail = "".join(log.readlines()[-5:])
        raise SystemExit(f"asymllm sweep: {label} failed in {run_dir} (exit {done.returncode}); log {log_path}:\n{tail}")


def collect(spec: RunSpec, train_dir: str, eval_dir: str, wall_s: float) -> dict:
    metrics = _read_json(os.path.join(train_dir, "metrics.json")) or {}
    state = _read_json(os.path.join(train_dir, "trainer_state.json")) or {}
    logged = [h for h in state.get("log_history", []) if "trainable_params" in h]
    summary = _read_json(os.path.join(eval_dir, "alpaca_summary.json")) or {}
    mmlu = _read_json(os.path.join(eval_dir, "mmlu.json")) or {}
    return {
        **asdict(spec),
        "trainable_params": metrics.get("trainable_params") or (logged[-1]["trainable_params"] if logged else None),
        "train_loss": metrics.get("train_loss"),
        "heldout_loss": metrics.get("eval_loss"),
        "heldout_exact_match": _exact_match(summary),
        "mmlu": mmlu.get("micro"),
        "wall_s": round(wall_s, 1),
    }


def _exact_match(summary: dict):
    value = summary.get("exact_match")
    return value.get("accuracy") if isinstance(value, dict) else value


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
