"""Training throughput and peak memory: asymllm A_rand_hB_zero vs plain TRL + peft LoRA (issue 3).

Run from the repository root:

    python benchmarks/train_throughput.py [--repeats N --warmup N --steps N --setups 1proc,zero3] [--output FILE]

Two variants, same model, data, rank, batch and SFTConfig values, measured by the same code
(benchmarks/_train_worker.py):

- asymllm A_rand_hB_zero r=16: `asymllm.training.train.main` (what `asymllm train` runs);
- peer: plain `trl.SFTTrainer(model=..., peft_config=LoraConfig(r=16, lora_alpha=32))`
  on the same tokenized dataset (asymllm.data.tokenize_examples).

Both adapt the 7 projections (q, k, v, o, gate, up, down) of the built-in model
(SmolLM2-135M-Instruct, converted locally, float32, sdpa attention) and train on the
built-in instructions, lr 1e-3 cosine, gradient checkpointing off, seed 42.

Two setups:
- 1proc: one process, batch 8, 2 torch threads;
- zero3: 2 processes (torch.distributed.run, gloo) under ds_configs/zero3.json, batch
  4 per process (8 in all), 1 torch thread each. Without CUDA, DeepSpeed needs the
  gloo bootstrap (asymllm.distributed.bootstrap_cpu_distributed); the peer gets it too.

Each run is a fresh subprocess (fresh memory accounting); the variants alternate, the
order flipping every repeat, so machine noise falls on both alike. Per run:
- loss tokens/s: loss-bearing tokens (labels != -100 after the causal shift, summed over
  ranks) of the timed steps (after `--warmup` untimed steps), over the wall time from the
  end of step `warmup` to the end of the last step (max over ranks);
- best-step tokens/s: the same tokens over the sum, per timed step index, of the fastest
  repeat's step time (both variants see the same batches at the same step, seed 42); a
  noise floor for a shared machine, where other processes inflate some steps;
- CPU s/step: process CPU time (user + sys, all threads, summed over ranks) per timed step;
- peak RSS (training): the high-water RSS during the training steps (VmHWM, reset at
  train begin), max over ranks; peak RSS (whole run): the high-water RSS over the whole
  process (loading included), max over ranks.
Medians over the repeats are reported, and where a step's time goes (benchmarks/_train_worker.py,
`Phases`: decoder forward, LM head and TRL's per-token outputs, backward, clipping, optimizer, the
rest). `--output FILE` also writes the report (markdown).

RSS counts what glibc keeps after tensors are freed, so peaks vary by about +-100 MiB
from run to run. For a figure closer to live tensor memory, run with
MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 in the environment (large blocks then
go back to the OS when freed; steps get slower, for both variants alike); the header
records any MALLOC_* settings. Each run's per-step RSS trace (step begin, forward end,
peak so far) is in WORKDIR/<setup>-<variant>-<repeat>/rank<R>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from _report import emit  # benchmarks/_report.py (a script's own folder is on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "benchmarks", "_train_worker.py")
sys.path.insert(0, REPO)

ASYM, PEER = "asymllm", "peer"
LABELS = {ASYM: "asymllm A_rand_hB_zero r=16", PEER: "TRL SFTTrainer + peft LoRA r=16 (peer)"}
SETUPS = {
    "1proc": dict(title="1 process", nproc=1, batch=8, threads=2, deepspeed=None),
    "zero3": dict(title="ZeRO-3, 2 processes", nproc=2, batch=4, threads=1, deepspeed="ds_configs/zero3.json"),
}
TARGET_SPEED_RATIO = 1.0   # asymllm loss tokens/s >= peer's
TARGET_MEMORY_RATIO = 1.0  # asymllm peak RSS <= peer's


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setups", default="1proc,zero3", help="comma-separated, of: " + ", ".join(SETUPS))
    p.add_argument("--repeats", type=int, default=2, help="runs per variant and setup (default 2)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per run first (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    p.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--dataset", default=None, help="training data (default: the built-in instructions)")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per run before it counts as failed")
    p.add_argument("--workdir", default=None, help="where runs write logs and results (default: a temp folder)")
    p.add_argument("--output", help="also write the markdown report to this file")
    args = p.parse_args(argv)
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [s for s in args.setups if s not in SETUPS]
    if unknown or not args.setups:
        p.error(f"--setups: unknown {unknown}; choose from {list(SETUPS)}")
    if args.repeats < 1 or args.warmup < 1 or args.steps < 1:
        p.error("need --repeats >= 1, --warmup >= 1, --steps >= 1")
    return args


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(args, setup_name: str, variant: str, repeat: int, model: str, dataset: str) -> dict:
    setup = SETUPS[setup_name]
    out = os.path.join(args.workdir, f"{setup_name}-{variant}-{repeat}")
    os.makedirs(out, exist_ok=True)
    worker_args = [WORKER, "--variant", variant, "--model", model, "--dataset", dataset,
                   "--batch", str(setup["batch"]), "--threads", str(setup["threads"]),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--out", out]
    if setup["deepspeed"]:
        worker_args += ["--deepspeed", os.path.join(REPO, setup["deepspeed"])]
    if setup["nproc"] > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(setup["nproc"]),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port())] + worker_args
    else:
        command = [sys.executable] + worker_args
    env = dict(os.environ, OMP_NUM_THREADS=str(setup["threads"]), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(os.path.join(out, "log.txt"), "w") as log:
        try:
            proc = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - start
    if rc != 0:
        with open(os.path.join(out, "log.txt")) as f:
            tail = f.read()[-6000:]
        raise SystemExit(f"run {setup_name}/{variant}/{repeat} failed ({rc}); log {out}/log.txt:\n{tail}")
    ranks = []
    for rank in range(setup["nproc"]):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return summarise_run(ranks, wall, load_before, args.warmup, args.steps)


def summarise_run(ranks: list[dict], wall: float, load_before, warmup: int, steps: int) -> dict:
    timed = slice(warmup, warmup + steps)
    tokens = sum(r["loss_tokens_timed"] for r in ranks)
    seconds = max(r["timed_seconds"] for r in ranks)
    # per timed step: the slowest rank's step time (the ranks wait for each other) and all ranks' tokens
    step_seconds = [max(vals) for vals in zip(*(r["step_seconds"][timed] for r in ranks))]
    step_tokens = [sum(vals) for vals in zip(*(r["step_loss_tokens"][timed] for r in ranks))]
    kib = 1024
    return {
        "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "warmup_step_seconds": [max(vals) for vals in zip(*(r["step_seconds"][:warmup] for r in ranks))],
        "step_seconds": step_seconds, "step_tokens": step_tokens, "steps_timed": len(step_seconds),
        "cpu_per_step": sum(r["timed_cpu_seconds"] for r in ranks) / steps,
        "peak_train_mib": max(r["during_train"]["VmHWM"] for r in ranks) / kib,
        "peak_load_mib": max(r["before_train"]["VmHWM"] for r in ranks) / kib,
        "peak_whole_mib": max(max(r["before_train"]["VmHWM"], r["at_exit"]["VmHWM"]) for r in ranks) / kib,
        "peak_train_sum_mib": sum(r["during_train"]["VmHWM"] for r in ranks) / kib,
        "trainable": ranks[0]["trainable_params"], "total": ranks[0]["total_params"],
        "peak_reset": all(r["peak_reset"] for r in ranks), "wall": wall,
        "load_before": load_before, "load_end_of_train": ranks[0]["loadavg_end_of_train"],
        "threads": ranks[0]["torch_threads"],
        "phases": {name: statistics.median(step[name] for step in ranks[0]["step_phases"][timed])
                   for name in ranks[0]["step_phases"][0]},
    }


def aggregate(runs: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    best_steps = [min(vals) for vals in zip(*(r["step_seconds"] for r in runs))]
    return {
        "tokens_per_s": med("tokens_per_s"), "best_tokens_per_s": sum(runs[0]["step_tokens"]) / sum(best_steps),
        "cpu_per_step": med("cpu_per_step"), "peak_train_mib": med("peak_train_mib"),
        "peak_whole_mib": med("peak_whole_mib"), "peak_load_mib": med("peak_load_mib"),
        "peak_train_sum_mib": med("peak_train_sum_mib"),
        "trainable": runs[0]["trainable"], "total": runs[0]["total"], "steps_timed": runs[0]["steps_timed"],
        "tokens": runs[0]["tokens"], "same_tokens": len({tuple(r["step_tokens"]) for r in runs}) == 1,
        "phases": {name: statistics.median(r["phases"][name] for r in runs) for name in runs[0]["phases"]},
        "step_seconds": statistics.median(statistics.median(r["step_seconds"]) for r in runs),
    }


def phase_table(results: dict, setups: list[str]) -> list[str]:
    """Where a timed step's time goes (rank 0; medians over steps, then over runs)."""
    lines = ["Where a step's time goes (rank 0, seconds per timed step; medians over steps, then runs):", "",
             "| setup | part of the step | asymllm s | peer s | asymllm / peer | share of asymllm's step |",
             "|---|---|---:|---:|---:|---:|"]
    for setup in setups:
        a, p = results[setup][ASYM], results[setup][PEER]
        for name in a["phases"]:
            x, y = a["phases"][name], p["phases"][name]
            ratio = f"{x / y:.3f}" if y > 0 else "-"
            lines.append(f"| {SETUPS[setup]['title']} | {name} | {x:.3f} | {y:.3f} | {ratio} | {100 * x / a['step_seconds']:.0f}% |")
        lines.append(f"| {SETUPS[setup]['title']} | whole step (median) | {a['step_seconds']:.3f} | {p['step_seconds']:.3f} | "
                     f"{a['step_seconds'] / p['step_seconds']:.3f} | 100% |")
    return lines


def header(args, model: str, dataset: str, load: tuple, total_seconds: float) -> list[str]:
    import peft
    import torch
    import transformers
    import trl

    import deepspeed

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    fmt = lambda la: "/".join(f"{x:.2f}" for x in la)  # noqa: E731
    malloc = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    setups = "; ".join(f"{SETUPS[s]['title']}: batch {SETUPS[s]['batch']} per process x {SETUPS[s]['nproc']}, "
                       f"{SETUPS[s]['threads']} torch thread(s) per process"
                       + (f", {SETUPS[s]['deepspeed']}" if SETUPS[s]["deepspeed"] else "") for s in args.setups)
    return [
        f"- run: {now}, torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
        f"peft {peft.__version__}, deepspeed {deepspeed.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()} with {os.cpu_count()} CPUs; {git_state()}",
        f"- load average (1/5/15 min) at start {fmt(load[0])}, at end {fmt(load[1])}; the whole benchmark took "
        f"{total_seconds / 60:.1f} min",
        f"- model: {model}; data: {dataset}; float32, sdpa, gradient checkpointing off, lr 1e-3 cosine, seed 42; "
        f"adapters r=16, alpha=32, dropout 0 on q, k, v, o, gate, up, down",
        f"- setups: {setups}",
        f"- per run: {args.warmup} untimed + {args.steps} timed steps; {args.repeats} run(s) per variant and setup, "
        f"alternating, order flipped each repeat; medians over the runs",
    ] + ([f"- allocator settings from the environment: {', '.join(malloc)}"] if malloc else [])


def git_state() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "asymllm"], cwd=REPO, capture_output=True,
                               text=True).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
        return f"commit {commit}" + (f" with uncommitted changes in {', '.join(dirty)}" if dirty else " (asymllm/ clean)")
    except OSError:
        return "git state unknown"


def table(results: dict, setups: list[str]) -> list[str]:
    lines = ["| setup | variant | loss tokens/s | vs peer | best-step tokens/s | vs peer | CPU s/step | "
             "peak RSS MiB (training) | vs peer | peak RSS MiB (whole run) | trainable params | steps timed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setup in setups:
        peer = results[setup][PEER]
        for variant in (ASYM, PEER):
            r = results[setup][variant]
            lines.append(
                f"| {SETUPS[setup]['title']} | {LABELS[variant]} | {r['tokens_per_s']:.2f} | "
                f"{r['tokens_per_s'] / peer['tokens_per_s']:.3f} | {r['best_tokens_per_s']:.2f} | "
                f"{r['best_tokens_per_s'] / peer['best_tokens_per_s']:.3f} | {r['cpu_per_step']:.2f} | "
                f"{r['peak_train_mib']:.0f} | {r['peak_train_mib'] / peer['peak_train_mib']:.3f} | "
                f"{r['peak_whole_mib']:.0f} | {r['trainable']:,} | {r['steps_timed']} ({r['tokens']} tokens) |")
    return lines


def run_lines(all_runs: list[tuple]) -> list[str]:
    fmt = lambda la: "/".join(f"{x:.2f}" for x in la)  # noqa: E731
    lines = ["Runs, in the order they ran:", ""]
    for setup, variant, repeat, r in all_runs:
        lines.append(
            f"- {SETUPS[setup]['title']}, {variant} #{repeat + 1}: {r['tokens_per_s']:.2f} loss tokens/s "
            f"({r['tokens']} tokens in {r['seconds']:.1f} s), step times {min(r['step_seconds']):.2f}-"
            f"{max(r['step_seconds']):.2f} s (median {statistics.median(r['step_seconds']):.2f}; warm-up steps "
            f"{', '.join(f'{x:.1f}' for x in r['warmup_step_seconds'])} s), "
            f"CPU {r['cpu_per_step']:.2f} s/step, peak RSS training {r['peak_train_mib']:.0f} MiB "
            f"(sum over ranks {r['peak_train_sum_mib']:.0f}), loading {r['peak_load_mib']:.0f} MiB, "
            f"run {r['wall']:.0f} s, load average before {fmt(r['load_before'])}")
    return lines


def verdicts(results: dict, setups: list[str]) -> list[str]:
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    lines = []
    for setup in setups:
        a, p = results[setup][ASYM], results[setup][PEER]
        speed = a["tokens_per_s"] / p["tokens_per_s"]
        best = a["best_tokens_per_s"] / p["best_tokens_per_s"]
        memory = a["peak_train_mib"] / p["peak_train_mib"]
        whole = a["peak_whole_mib"] / p["peak_whole_mib"]
        same = a["same_tokens"] and p["same_tokens"] and a["tokens"] == p["tokens"]
        title = SETUPS[setup]["title"]
        lines += [
            f"target ({title}): loss tokens/s >= {TARGET_SPEED_RATIO:.2f} x peer: "
            f"{verdict(speed >= TARGET_SPEED_RATIO)} ({speed:.3f}; best-step {best:.3f})",
            f"target ({title}): peak RSS <= {TARGET_MEMORY_RATIO:.2f} x peer: "
            f"{verdict(memory <= TARGET_MEMORY_RATIO)} (training {memory:.3f}; whole run {whole:.3f})",
            f"check ({title}): both variants counted the same loss tokens on the same batches: "
            f"{'yes' if same else 'NO'} ({a['tokens']} vs {p['tokens']})",
        ]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    from asymllm.builtin import builtin_model_dir
    from asymllm.data import BUILTIN_DATASET

    model = args.model or builtin_model_dir()
    dataset = args.dataset or BUILTIN_DATASET
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="train_throughput.")
    print(f"runs write to {args.workdir}", flush=True)
    load_start, start = os.getloadavg(), time.perf_counter()
    per_variant = {s: {ASYM: [], PEER: []} for s in args.setups}
    all_runs = []
    for setup in args.setups:
        for repeat in range(args.repeats):
            order = (ASYM, PEER) if repeat % 2 == 0 else (PEER, ASYM)
            for variant in order:
                print(f"{SETUPS[setup]['title']}: {variant} run {repeat + 1}/{args.repeats} ...", flush=True)
                r = run_once(args, setup, variant, repeat, model, dataset)
                print(f"  {r['tokens_per_s']:.2f} loss tokens/s, peak RSS (training) {r['peak_train_mib']:.0f} MiB, "
                      f"{r['wall']:.0f} s", flush=True)
                per_variant[setup][variant].append(r)
                all_runs.append((setup, variant, repeat, r))
    results = {s: {v: aggregate(runs) for v, runs in by_variant.items()} for s, by_variant in per_variant.items()}
    report = (header(args, model, dataset, (load_start, os.getloadavg()), time.perf_counter() - start) + [""]
              + table(results, args.setups) + [""] + verdicts(results, args.setups) + [""]
              + phase_table(results, args.setups) + [""] + run_lines(all_runs))
    if not all(r["peak_reset"] for *_, r in all_runs):
        report.append("note: /proc/self/clear_refs could not reset the peak RSS; 'training' peaks include loading")
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
