"""One sweep cell: a recipe x rank x learning rate x seed trained and evaluated by the normal
`asymllm train` and `asymllm eval` commands, each its own process, with its result.json.

A finished cell leaves `result.json` in its folder with the settings it ran with and the
fingerprint of the adapter it evaluated (asymllm/fingerprint.py). What happens to it on a
rerun is decided for every cell of a phase before any runs (plan_cell):
- changed training settings (flags, the rate, the --config file's or the data's content):
  trained afresh (--overwrite_output_dir);
- changed evaluation settings alone: the kept adapter is evaluated again; where the adapter
  is gone the phase stops first, listing those cells, unless --retrain_to_evaluate;
- a changed adapter: evaluated again; a missing one: trained again (or, with
  --reuse_without_adapter, its result reused and said so);
- a diverged cell (train's exit 3) is a result: recorded with its step, the worst in
  selection, not retried while its settings stay the same.
An unfinished cell continues its checkpoint, which `asymllm train` refuses when it was made
with other settings (exit 4): the cell then starts afresh and the log says why.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from ..adapters.recipe import Recipe
from ..data import BUILTIN_HELDOUT
from ..fingerprint import adapter_fingerprint, fingerprint_changes
from ..training.checkpoints import EXIT_STALE_CHECKPOINT
from ..training.faults import DIVERGED_FILE, EXIT_DIVERGED

logger = logging.getLogger("asymllm.sweep")
# A result.json of the same settings whose adapter is gone: pruned for disk, or a sweep resumed
# elsewhere from its committed result files. Reused only when the user says so.
ADAPTER_GONE = "result.json is there but its adapter"
TRAIN_OUTCOMES = (EXIT_DIVERGED, EXIT_STALE_CHECKPOINT)  # results of a cell, not failures of the sweep
STALE_PREFIX, STALE_MARK = "asymllm train: error: --resume_from_checkpoint", "made with other settings"
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
    eval_data: str | None = None  # --data for `asymllm eval alpaca`: the validation split, or the held-out set
    name: str = "grid"  # grid (no selection), selection or final
    data_sha256: dict | None = None  # the selection's split files: changed content is another setting


@dataclass
class CellPlan:
    """What to do with one cell, decided before the phase runs anything."""

    spec: RunSpec
    run_dir: str
    settings: dict
    action: str  # skip | reuse | evaluate | train | fresh | blocked
    reason: str | None = None
    done: dict | None = None


def run_cells(specs: list[RunSpec], phase: Phase, args) -> list[dict]:
    plans = [plan_cell(spec, phase, args) for spec in specs]
    blocked = [p for p in plans if p.action == "blocked"]
    if blocked:  # said before anything runs: a retrain of finished cells is the user's call
        raise SystemExit(f"asymllm sweep: {len(blocked)} finished cell(s) of the {phase.name} phase cannot be evaluated "
                         "again without training them again, their adapter being gone:\n"
                         + "\n".join(f"  {p.spec.name}: {p.reason}" for p in blocked)
                         + "\npass --retrain_to_evaluate to train them again, or run with their earlier evaluation settings")
    results = []
    for index, cell in enumerate(plans, 1):
        where = ("" if phase.name == "grid" else phase.name + " ") + f"[{index}/{len(plans)}] {cell.spec.name}"
        done = cell.done
        if cell.action == "skip":
            diverged = (done.get("diverged") or {}).get("where")
            logger.info("%s: done already, skipped%s", where, f" (diverged: {diverged})" if diverged else "")
        elif cell.action == "reuse":
            logger.info("%s: done already (its adapter is not here; result.json reused: --reuse_without_adapter)", where)
            done = {**done, "reused_without_adapter": True}
        elif cell.action == "evaluate":
            logger.info("%s: %s; re-evaluating", where, cell.reason)
            done = run_one(cell, phase, args, where, train=False, discard_evaluations=True)
        else:
            logger.info("%s: training%s", where, f" ({cell.reason})" if cell.reason else "")
            done = run_one(cell, phase, args, where, fresh=cell.action == "fresh")
        results.append({**done, "phase": phase.name})
    return results


def plan_cell(spec: RunSpec, phase: Phase, args) -> CellPlan:
    """Reuse a finished cell only for the same training settings and adapter; an evaluation
    change alone re-evaluates the kept adapter (or, its adapter gone, is blocked unless
    --retrain_to_evaluate); an unfinished cell continues its checkpoint (train refuses one of
    other settings, and the cell then starts afresh: run_one)."""
    run_dir = os.path.join(phase.runs_dir, spec.name)
    settings = cell_settings(spec, phase, args)
    done = load_result(run_dir)
    cell = CellPlan(spec, run_dir, settings, "train", done=done)
    if done is None:
        return cell
    recorded = done.get("settings")
    if recorded is None:
        return _set(cell, "fresh", "result.json records no settings (an older asymllm wrote it)")
    changed = sorted(k for k in {*settings, *recorded} - {"eval"} if recorded.get(k) != settings.get(k))
    if changed:
        return _set(cell, "fresh", f"its settings changed ({', '.join(changed)})")
    if done.get("diverged"):  # nothing to evaluate; the same settings would diverge again
        return _set(cell, "skip")
    evaluation = evaluation_changes(recorded.get("eval") or {}, settings["eval"])
    adapter = adapter_dir(run_dir)
    if not os.path.isdir(adapter):
        if evaluation:
            return _set(cell, "fresh" if args.retrain_to_evaluate else "blocked",
                        f"its evaluation settings changed ({evaluation}) and its adapter {adapter} is not there")
        return _set(cell, "reuse" if args.reuse_without_adapter else "fresh", f"{ADAPTER_GONE} {adapter} is not")
    fingerprint = done.get("adapter_fingerprint")
    if fingerprint is None:
        return _set(cell, "fresh", "result.json records no adapter fingerprint (an older asymllm wrote it)")
    changes = fingerprint_changes({"adapter": fingerprint}, {"adapter": adapter_fingerprint(adapter)})
    if changes:
        return _set(cell, "evaluate", f"the adapter changed since result.json was written ({changes['adapter']})")
    if evaluation:
        return _set(cell, "evaluate", f"its evaluation settings changed ({evaluation})")
    return _set(cell, "skip")


def _set(cell: CellPlan, action: str, reason: str | None = None) -> CellPlan:
    cell.action, cell.reason = action, reason
    return cell


def evaluation_changes(recorded: dict, now: dict) -> str:
    """Which evaluation settings differ ('' for none); --eval_flags only where alpaca runs."""
    keys = {*recorded, *now} - ({"eval_flags"} if not (recorded.get("alpaca") or now.get("alpaca")) else set())
    return ", ".join(sorted(k for k in keys if recorded.get(k) != now.get(k)))


def lora_alpha(spec: RunSpec, args) -> float | None:
    """alpha = alpha_ratio x r (the scale alpha/r the same at every rank); None when the training
    flags or the --config file give lora_alpha (then alpha_ratio is None: check_flags)."""
    return None if args.alpha_ratio is None else args.alpha_ratio * spec.rank


def cell_settings(spec: RunSpec, phase: Phase, args) -> dict:
    """What a cell's numbers depend on besides its adapter; output paths made relative, so a
    moved sweep folder is still the same sweep. Keys that do not apply are left out rather than
    set to None, so results of sweeps written before a key existed still compare equal."""
    root = os.path.abspath(args.output)

    def relative(flag: str) -> str:
        return os.path.relpath(flag, root) if os.path.isabs(flag) and flag.startswith(root + os.sep) else flag
    eval_data = None if phase.eval_data == BUILTIN_HELDOUT else phase.eval_data  # None: the built-in held-out set
    settings = {"run": asdict(spec), "lora_alpha": lora_alpha(spec, args), "config": args.config,
                "train_flags": [relative(f) for f in phase.train_flags], "data_sha256": phase.data_sha256,
                "eval": {"alpaca": phase.alpaca, "data": eval_data and relative(eval_data),
                         "eval_flags": args.eval_flags, "mmlu": args.mmlu}}
    if args.files_sha256:  # their content, not their path: an edited file is another setting
        settings["files_sha256"] = args.files_sha256
    return settings


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


def adapter_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "train", "adapter")


def run_one(cell: CellPlan, phase: Phase, args, where: str, train: bool = True, fresh: bool = False,
            discard_evaluations: bool = False) -> dict:
    """Train (unless `train` is False) and evaluate one cell. `fresh`: the cell's old run is of
    other settings, so training starts over (--overwrite_output_dir) and its evaluations go;
    otherwise an interrupted training or evaluation resumes. A training that diverges (exit 3)
    is the cell's result: recorded as diverged, never evaluated."""
    spec, run_dir, settings = cell.spec, cell.run_dir, cell.settings
    start = time.perf_counter()
    train_dir, eval_dir = os.path.join(run_dir, "train"), os.path.join(run_dir, "eval")
    if train:
        outcome = train_outcome(spec, train_dir, phase, args, settings, fresh, run_dir)
        if outcome == "stale checkpoint":  # its checkpoint is of other settings: start the cell afresh
            logger.info("%s: starting afresh: %s", where, _stale_line(os.path.join(run_dir, "train.log")))
            fresh = True
            outcome = train_outcome(spec, train_dir, phase, args, settings, fresh, run_dir)
        if outcome == "diverged":
            result = diverged_result(spec, train_dir, time.perf_counter() - start, settings)
            logger.info("%s: diverged (%s): counted as the worst", where, result["diverged"]["where"])
            write_result(run_dir, result)
            return result
    adapter = adapter_dir(run_dir)
    evaluated = adapter_fingerprint(adapter)  # taken before evaluating: what the evaluations are given
    overwrite = ["--overwrite"] if (discard_evaluations or fresh) else []
    if phase.alpaca:
        data = ["--data", phase.eval_data] if phase.eval_data else []
        _run([*_entry("", "eval"), "alpaca", "--adapter", adapter, "--output_dir", eval_dir, *data, *overwrite,
              *args.eval_flag_list], run_dir, "eval_alpaca")
    if args.mmlu:
        _run([*_entry("", "eval"), "mmlu", "--adapter", adapter, "--output_dir", eval_dir, *overwrite], run_dir, "eval_mmlu")
    result = {**collect(spec, train_dir, eval_dir, time.perf_counter() - start), "lora_alpha": settings["lora_alpha"],
              "adapter_fingerprint": evaluated, "settings": settings}
    write_result(run_dir, result)
    return result


def train_command(spec: RunSpec, train_dir: str, phase: Phase, args, settings: dict, fresh: bool) -> list[str]:
    command = [*_entry(args.launcher, "train"), "--recipe", spec.recipe, "--lora_r", str(spec.rank),
               "--seed", str(spec.seed), "--output_dir", train_dir,
               *(["--overwrite_output_dir"] if fresh else ["--resume_from_checkpoint", "auto"])]
    if spec.lr is not None:
        command += ["--learning_rate", f"{spec.lr:g}"]
    if settings["lora_alpha"] is not None:
        command += ["--lora_alpha", f"{settings['lora_alpha']:g}"]
    if args.config:
        command += ["--config", args.config]
    return command + phase.train_flags


def train_outcome(spec: RunSpec, train_dir: str, phase: Phase, args, settings: dict, fresh: bool, run_dir: str) -> str:
    """"trained", "diverged" or "stale checkpoint". A launcher (torchrun) turns every failed
    worker into its own exit code 1, so the two outcomes are also read off what train left: the
    divergence record written during this attempt, the refusal's line in the log."""
    started = time.time()
    command = train_command(spec, train_dir, phase, args, settings, fresh)
    code = _run(command, run_dir, "train", allowed=TRAIN_OUTCOMES if not args.launcher else (*TRAIN_OUTCOMES, 1))
    if code == 0:
        return "trained"
    record = os.path.join(train_dir, DIVERGED_FILE)
    if code == EXIT_DIVERGED or (os.path.isfile(record) and os.path.getmtime(record) >= started - 1):
        return "diverged"
    if not fresh and (code == EXIT_STALE_CHECKPOINT or _stale_line(os.path.join(run_dir, "train.log"))):
        return "stale checkpoint"
    log = os.path.join(run_dir, "train.log")
    raise SystemExit(f"asymllm sweep: train failed in {run_dir} (exit {code}); log {log}:\n{_tail(log)}")


def _stale_line(log_path: str) -> str | None:
    """train's one-line refusal of a checkpoint of other settings, if the log holds it."""
    with open(log_path) as f:
        return next((line.strip() for line in f if STALE_PREFIX in line and STALE_MARK in line), None)


def diverged_result(spec: RunSpec, train_dir: str, wall_s: float, settings: dict) -> dict:
    """A diverged cell's result.json: where it stopped (asymllm_diverged.json), no metrics (a
    metrics.json in the folder is an earlier run's)."""
    record = _read_json(os.path.join(train_dir, DIVERGED_FILE)) or {}
    where = record.get("where") or "the training diverged (exit 3)"
    step = record.get("step")
    if step is None and (found := re.search(r"step (\d+)", where)):
        step = int(found.group(1))
    return {**asdict(spec), "trainable_params": None, "train_loss": None, "heldout_loss": None,
            "heldout_exact_match": None, "mmlu": None, "wall_s": round(wall_s, 1),
            "diverged": {"where": where, "step": step}, "lora_alpha": settings["lora_alpha"],
            "adapter_fingerprint": None, "settings": settings}


def _entry(launcher: str, command: str) -> list[str]:
    """`asymllm <command>` as this interpreter runs it; training under a launcher uses launch/sft.py."""
    if launcher and command == "train":
        return [*shlex.split(launcher), os.path.join(ROOT, "launch", "sft.py")]
    return [sys.executable, "-m", "asymllm.cli", command]


def _run(command: list[str], run_dir: str, label: str, allowed: tuple[int, ...] = ()) -> int:
    """Run one step, its output to a log file in the run folder; an exit code outside 0 and
    `allowed` stops the sweep, naming the log."""
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, f"{label}.log")
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0 and done.returncode not in allowed:
        raise SystemExit(f"asymllm sweep: {label} failed in {run_dir} (exit {done.returncode}); log {log_path}:\n{_tail(log_path)}")
    return done.returncode


def _tail(log_path: str, lines: int = 5) -> str:
    with open(log_path) as log:
        return "".join(log.readlines()[-lines:])


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
