"""bf16 autocast vs fp32 on this CPU, through the real `asymllm train` (issue 12, part 1).

    python benchmarks/cpu_bf16.py                    # both modes, 30 steps each: loss tokens/s ratio
    python benchmarks/cpu_bf16.py --end_to_end       # also the default run (120 steps) in both modes,
                                                     # wall time and held-out exact match of each

Each mode is one `asymllm train` process on the built-in default (SmolLM2-135M-Instruct,
A_rand_hB_zero r=16, built-in data), differing only in --cpu_autocast_bf16. Throughput is the
trainer's own loss_tokens_per_s log values (median, first log left out: warm-up); quality is
`asymllm eval alpaca` on the built-in held-out set (120 items, greedy, fp32 both). Run on an
otherwise idle machine: two heavy jobs at once on 2 cores distort both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from asymllm.training.precision import cpu_bf16_units  # noqa: E402

MODES = {"fp32": "false", "bf16 autocast": "true"}


def asymllm(*args: str, log: str) -> float:
    """Run `asymllm ARGS` with its output in `log`; the wall seconds it took."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "asymllm.cli", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"asymllm {' '.join(args)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def logged(run_dir: str, key: str) -> list[float]:
    """`key` from the log history of the run's last checkpoint (every run saves one at its end)."""
    last = max((d for d in os.listdir(run_dir) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
    state = os.path.join(run_dir, last, "trainer_state.json")
    with open(state) as f:
        return [h[key] for h in json.load(f)["log_history"] if key in h]


def train(work: str, mode: str, flags: list[str]) -> dict:
    run_dir = os.path.join(work, f"{mode.replace(' ', '_')}-{flags[1] if flags else 'default'}")
    wall = asymllm("train", "--output_dir", run_dir, "--cpu_autocast_bf16", MODES[mode], *flags, log=run_dir + ".log")
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    speeds = logged(run_dir, "loss_tokens_per_s")[1:]
    return {"run_dir": run_dir, "wall_s": wall, "tokens_per_s": statistics.median(speeds), "n_logs": len(speeds),
            "train_loss": metrics.get("train_loss"), "heldout_loss": metrics.get("eval_loss")}


def exact_match(work: str, run: dict) -> float:
    eval_dir = run["run_dir"] + "-eval"
    asymllm("eval", "alpaca", "--adapter", os.path.join(run["run_dir"], "adapter"), "--output_dir", eval_dir,
            log=eval_dir + ".log")
    with open(os.path.join(eval_dir, "alpaca_summary.json")) as f:
        return json.load(f)["exact_match"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="steps of the throughput runs")
    parser.add_argument("--end_to_end", action="store_true", help="also the default run in both modes, with exact match")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    units = cpu_bf16_units()
    if units is None:
        sys.exit("this CPU reports no bf16 units (amx_bf16 / avx512_bf16): nothing to compare")
    work = args.work or tempfile.mkdtemp(prefix="cpu_bf16-")
    os.makedirs(work, exist_ok=True)
    print(f"run: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()} with {os.cpu_count()} CPUs ({units}), load {os.getloadavg()[0]:.2f}; work {work}")
    short = {mode: train(work, mode, ["--max_steps", str(args.steps), "--logging_steps", "5"]) for mode in MODES}
    ratio = short["bf16 autocast"]["tokens_per_s"] / short["fp32"]["tokens_per_s"]
    print(f"\n| {args.steps} steps | loss tokens/s (median) | train loss | vs fp32 |\n|---|---:|---:|---:|")
    for mode, r in short.items():
        print(f"| {mode} | {r['tokens_per_s']:.1f} | {r['train_loss']:.4f} | {r['tokens_per_s'] / short['fp32']['tokens_per_s']:.3f}x |")
    print(f"\nbf16 autocast / fp32 loss tokens/s: {ratio:.3f}x")
    if not args.end_to_end:
        return
    full = {mode: train(work, mode, []) for mode in MODES}
    for run in full.values():
        run["exact_match"] = exact_match(work, run)
    print("\n| default run (120 steps) | wall | held-out loss | held-out exact match | wall vs fp32 |\n|---|---:|---:|---:|---:|")
    for mode, r in full.items():
        print(f"| {mode} | {r['wall_s'] / 60:.2f} min | {r['heldout_loss']:.4f} | {r['exact_match']:.1%} "
              f"| {r['wall_s'] / full['fp32']['wall_s']:.3f}x |")
    gap = 100 * (full["bf16 autocast"]["exact_match"] - full["fp32"]["exact_match"])
    print(f"\nexact match bf16 - fp32: {gap:+.1f} points (target: within 2); "
          f"wall time {full['bf16 autocast']['wall_s'] / full['fp32']['wall_s']:.3f}x (target <= 0.5x)")


if __name__ == "__main__":
    main()
