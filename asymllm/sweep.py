"""`asymllm sweep`: every recipe x rank x seed through the normal training and evaluation
commands, one after another, resumable, then one table and one plot.

    asymllm sweep --recipes lora,asym,a_only,A_V_hB_zero --ranks 16 --seeds 0,1,2 --output sweeps/smol
    asymllm sweep ... --launcher "torchrun --nproc_per_node 8" -- --deepspeed ds_configs/zero3.json

Each run is a separate process (`asymllm train`, then `asymllm eval alpaca` on the held-out
data, and `asymllm eval mmlu` with --mmlu), so a sweep exercises exactly what a user runs
and a crash in one run cannot corrupt another. A finished run leaves `result.json` in its
folder, with the fingerprint of the adapter it evaluated (asymllm/fingerprint.py); a rerun
of the same command skips it while the adapter is the same, so a stopped sweep resumes. A
cell whose adapter changed since (trained again into its folder, replaced by hand) is
evaluated again, not reused; one whose adapter is gone is trained again.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from .adapters.recipe import Recipe
from .cli_args import ArgumentParser
from .fingerprint import adapter_fingerprint, fingerprint_changes

logger = logging.getLogger("asymllm.sweep")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["recipe", "rank", "seed", "trainable_params", "train_loss", "heldout_loss", "heldout_exact_match", "mmlu", "wall_s"]


@dataclass(frozen=True)
class RunSpec:
    recipe: str  # canonical name
    rank: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.recipe}-r{self.rank}-s{self.seed}"


def parse_args(argv):
    parser = ArgumentParser(prog="asymllm sweep", description="train and evaluate every recipe x rank x seed")
    parser.add_argument("--recipes", required=True, help="comma-separated recipe names or aliases")
    parser.add_argument("--ranks", default="16", help="comma-separated ranks")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--config", help="YAML run configuration passed to every `asymllm train`")
    parser.add_argument("--output", required=True, help="sweep folder (runs/, sweep.csv, sweep.md, sweep.png)")
    parser.add_argument("--mmlu", action="store_true", help="also run `asymllm eval mmlu` on each adapter")
    parser.add_argument("--eval_flags", default="", help="extra flags for `asymllm eval alpaca`, e.g. '--limit 60'")
    parser.add_argument("--launcher", default="", help="prefix for training, e.g. 'torchrun --nproc_per_node 8' (default: one process)")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER, help="after `--`: flags for every `asymllm train`")
    args = parser.parse_args(argv)
    args.train_flags = [f for f in args.train_flags if f != "--"]
    return args


def plan(recipes: str, ranks: str, seeds: str) -> list[RunSpec]:
    names = [Recipe.parse(r.strip()).name for r in recipes.split(",") if r.strip()]
    return [RunSpec(n, int(r), int(s)) for n in names for r in _ints(ranks, "--ranks") for s in _ints(seeds, "--seeds")]


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"asymllm sweep: {flag} {text!r}: expected comma-separated integers") from None


def main(argv=None) -> list[dict]:
    logging.basicConfig(format="[asymllm sweep] %(message)s", level=logging.INFO)
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    specs = plan(args.recipes, args.ranks, args.seeds)
    results = []
    for index, spec in enumerate(specs, 1):
        run_dir = os.path.join(args.output, "runs", spec.name)
        done = load_result(run_dir)
        stale = None if done is None else stale_reason(done, run_dir)
        if done is not None and stale is None:
            logger.info("[%d/%d] %s: done already, skipped", index, len(specs), spec.name)
        elif done is not None and os.path.isdir(_adapter_dir(run_dir)):
            logger.info("[%d/%d] %s: %s; re-evaluating", index, len(specs), spec.name, stale)
            done = run_one(spec, run_dir, args, train=False, discard_evaluations=True)
        else:
            logger.info("[%d/%d] %s: training%s", index, len(specs), spec.name, f" ({stale})" if stale else "")
            done = run_one(spec, run_dir, args, discard_evaluations=stale is not None)
        results.append(done)
    write_table(results, args.output)
    plot(results, os.path.join(args.output, "sweep.png"))
    logger.info("table: %s, %s; plot: %s", *(os.path.join(args.output, f) for f in ("sweep.md", "sweep.csv", "sweep.png")))
    return results


def load_result(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def stale_reason(result: dict, run_dir: str) -> str | None:
    """Why `result` (a cell's result.json) cannot be reused, or None: it must be of the
    adapter now in the cell's folder, not merely of the same path."""
    adapter = _adapter_dir(run_dir)
    if not os.path.isdir(adapter):
        return f"result.json is there but its adapter {adapter} is not"
    recorded = result.get("adapter_fingerprint")
    if recorded is None:
        return "result.json records no adapter fingerprint (an older asymllm wrote it)"
    changes = fingerprint_changes({"adapter": recorded}, {"adapter": adapter_fingerprint(adapter)})
    return f"the adapter changed since result.json was written ({changes['adapter']})" if changes else None


def _adapter_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "train", "adapter")


def run_one(spec: RunSpec, run_dir: str, args, train: bool = True, discard_evaluations: bool = False) -> dict:
    """Train (unless `train` is False) and evaluate one cell. `discard_evaluations`: the cell's
    old evaluations are of another adapter (its result was stale), so they go (--overwrite);
    otherwise an interrupted evaluation of this adapter resumes."""
    start = time.perf_counter()
    train_dir, eval_dir = os.path.join(run_dir, "train"), os.path.join(run_dir, "eval")
    if train:
        train_cmd = [*_entry(args.launcher, "train"), "--recipe", spec.recipe, "--lora_r", str(spec.rank),
                     "--seed", str(spec.seed), "--output_dir", train_dir, "--resume_from_checkpoint", "auto"]
        if args.config:
            train_cmd += ["--config", args.config]
        _run(train_cmd + args.train_flags, run_dir, "train")
    adapter = _adapter_dir(run_dir)
    evaluated = adapter_fingerprint(adapter)  # taken before evaluating: what the evaluations are given
    overwrite = ["--overwrite"] if discard_evaluations else []
    _run([*_entry("", "eval"), "alpaca", "--adapter", adapter, "--output_dir", eval_dir, *overwrite,
          *shlex.split(args.eval_flags)], run_dir, "eval_alpaca")
    if args.mmlu:
        _run([*_entry("", "eval"), "mmlu", "--adapter", adapter, "--output_dir", eval_dir, *overwrite], run_dir, "eval_mmlu")
    result = {**collect(spec, train_dir, eval_dir, time.perf_counter() - start), "adapter_fingerprint": evaluated}
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
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


def write_table(results: list[dict], output: str) -> None:
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in COLUMNS} for r in results)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in COLUMNS) + " |" for r in results]
    lines += ["", "Per recipe and rank (mean ± sample std over seeds):", "",
              "| recipe | rank | runs | trainable params | held-out exact match | held-out loss |", "|---|---|---|---|---|---|"]
    for (recipe, rank), group in _groups(results).items():
        lines.append(f"| {recipe} | {rank} | {len(group)} | {_cell(group[0].get('trainable_params'))} | "
                     f"{_mean_std([g.get('heldout_exact_match') for g in group])} | {_mean_std([g.get('heldout_loss') for g in group])} |")
    with open(os.path.join(output, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _groups(results: list[dict]) -> dict:
    groups: dict = {}
    for r in results:
        groups.setdefault((r["recipe"], r["rank"]), []).append(r)
    return groups


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and value > 9999:
        return f"{value:,}"
    return str(value)


def plot(results: list[dict], path: str) -> None:
    """Held-out metric against trainable parameters: one dot per run, mean ± std per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "heldout_exact_match" if any(r.get("heldout_exact_match") is not None for r in results) else "heldout_loss"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (recipe, rank), group in _groups(results).items():
        xs = [g["trainable_params"] for g in group if g.get(metric) is not None]
        ys = [g[metric] for g in group if g.get(metric) is not None]
        if not ys:
            continue
        dots = ax.scatter(xs, ys, alpha=0.5, s=18)
        spread = statistics.stdev(ys) if len(ys) > 1 else 0.0
        ax.errorbar([statistics.mean(xs)], [statistics.mean(ys)], yerr=[spread], fmt="o", ms=8, capsize=5,
                    color=dots.get_facecolor()[0], label=f"{recipe} r={rank}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
