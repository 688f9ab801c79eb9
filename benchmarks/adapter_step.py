"""One training step of a ~10M-parameter Llama: frozen base, peft LoRA and two LoRASYM recipes (issue 2).

Run from the repository root:

    python benchmarks/adapter_step.py [--steps N --warmup N --threads N] [--autocast] [--device cuda] [--output FILE]

A step is what a Trainer step is: zero_grad, forward with labels (causal-LM loss),
backward, AdamW step. The optimizer holds only parameters with requires_grad, as
Trainer's does. Batch 4 x 256 tokens, random token ids (the same batch every step),
random weights from `asymllm.tiny`. Variants, each a fresh model built from the same seed:

- frozen base (fwd+bwd, no optimizer): every parameter frozen; the embedding output
  is made to require grad (`enable_input_require_grads`, as gradient checkpointing
  does), so backward runs through every layer but produces no weight gradient.
  This is the floor an adapter step adds to.
- peft LoRA r=16: `peft.get_peft_model` with `LoraConfig(r=16, lora_alpha=32)`.
- asymllm hA_he_hB_zero r=16: LoRASYM's spelling of LoRA (A trained, B trained).
- asymllm A_rand_hB_zero r=16 (peft forward): A random orthonormal and frozen, B trained,
  computed by peft's LoRA forward (`fuse_frozen_a=False`, `--fused_frozen_a false`).
- asymllm A_rand_hB_zero r=16: the same adapter on asymllm's default fused frozen-A path
  (A's projection in the base GEMM, `asymllm/adapters/fused.py`; issue 29).

All adapters go into the same 7 projections (q, k, v, o, gate, up, down).

`--autocast` runs every forward under `torch.autocast(device_type, dtype=torch.bfloat16)` (fp32
weights, bf16 products: what `--cpu_autocast_bf16 true` and, on a GPU, `--bf16` train in); on a
CPU it needs bf16 units (amx_bf16 or avx512_bf16) to mean anything. `--device cuda` runs every
variant on the GPU (each step timed between CUDA synchronisations; benchmarks/gpu_check.sh runs
it with `--autocast`).

The variants are timed interleaved: each round runs one step of every variant, in an
order rotated every round, so machine noise (other processes on a shared CPU) falls on
all of them alike. Reported: median, minimum and maximum step time (a maximum far above
the median means another process took the CPUs for a while), the median's ratio to peft
LoRA, trainable parameters, and the bytes of every tensor in AdamW's state after the
first step (exp_avg, exp_avg_sq and the step counter; it does not grow afterwards).

After the steps, each adapter's factors are checked against its recipe: a frozen factor
must be bit-identical to its initial value and have no gradient, a trained one must have
moved. A failed check exits with status 1. `--output FILE` also writes the report (markdown).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model

from asymllm import LoRASYMConfig, Recipe, count_parameters, get_lorasym_model, lora_layers
from asymllm.tiny import tiny_causal_lm

from _report import emit  # benchmarks/_report.py (a script's own folder is on sys.path)

MODEL = dict(vocab_size=8192, hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2,
             intermediate_size=688, max_positions=512)
BATCH, SEQ_LEN = 4, 256
RANK, ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEARNING_RATE = 2e-4
SEED = 0
REFERENCE = "peft LoRA r=16"
ASYM = "asymllm A_rand_hB_zero r=16"
ASYM_PEFT_FORWARD = "asymllm A_rand_hB_zero r=16 (peft forward)"
TARGET_TIME_RATIO = 0.90   # the fused A_rand_hB_zero step at most 0.90x peft LoRA's (issue 29)
TARGET_STATE_RATIO = 0.55  # optimizer state at most 55% of LoRA's

# peft 0.21 asks transformers 5 for a renamed attribute; harmless, and it would clutter the report
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--autocast", action="store_true", help="forwards under bf16 autocast")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output", help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("need --steps >= 1, --warmup >= 0, --threads >= 1")
    return args


# --- the variants -------------------------------------------------------------------------

def fresh_base() -> torch.nn.Module:
    """The same random ~10M-parameter Llama every call, in training mode."""
    return tiny_causal_lm("llama", seed=SEED, **MODEL).train()


def frozen_base(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    model.enable_input_require_grads()  # backward through all layers, no weight gradients
    return model


def peft_lora(model: torch.nn.Module) -> torch.nn.Module:
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def lorasym(recipe: str, fuse: bool = True) -> Callable[[torch.nn.Module], torch.nn.Module]:
    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return get_lorasym_model(model, LoRASYMConfig(recipe=recipe, r=RANK, lora_alpha=ALPHA, seed=SEED, fuse_frozen_a=fuse))
    return wrap


# name -> (wrap the fresh base, the recipe its factors must follow, or None for no adapter)
VARIANTS: dict[str, tuple[Callable, Recipe | None]] = {
    "frozen base (fwd+bwd, no optimizer)": (frozen_base, None),
    REFERENCE: (peft_lora, Recipe.parse("hA_he_hB_zero")),
    "asymllm hA_he_hB_zero r=16": (lorasym("hA_he_hB_zero"), Recipe.parse("hA_he_hB_zero")),
    ASYM_PEFT_FORWARD: (lorasym("A_rand_hB_zero", fuse=False), Recipe.parse("A_rand_hB_zero")),
    ASYM: (lorasym("A_rand_hB_zero"), Recipe.parse("A_rand_hB_zero")),
}


@dataclass
class Run:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    expected: Recipe | None
    initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    trainable: int
    total: int
    state_bytes: int | None = None
    times: list[float] = field(default_factory=list)


def build_run(name: str, device: str) -> Run:
    wrap, expected = VARIANTS[name]
    torch.manual_seed(SEED)  # peft draws its default A init from the global generator
    model = wrap(fresh_base()).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE) if params else None
    trainable, total = count_parameters(model)
    return Run(name, model, optimizer, expected, factor_snapshot(model), trainable, total)


def factor_snapshot(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone())
            for name, layer in lora_layers(model)}


# --- one step, and the interleaved timing loop --------------------------------------------

def make_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ_LEN), generator=generator)


def train_step(run: Run, input_ids: torch.Tensor, autocast: bool) -> float:
    """Seconds for zero_grad + forward + backward + optimizer step."""
    cuda = input_ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    if run.optimizer is not None:
        run.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = run.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    if run.optimizer is not None:
        run.optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t))


def run_rounds(runs: list[Run], input_ids: torch.Tensor, rounds: int, timed: bool, autocast: bool) -> None:
    """One step of every variant per round, the order rotated by one each round."""
    for round_index in range(rounds):
        shift = round_index % len(runs)
        for run in runs[shift:] + runs[:shift]:
            seconds = train_step(run, input_ids, autocast)
            if run.state_bytes is None:  # AdamW allocates all its state in the first step
                run.state_bytes = optimizer_state_bytes(run.optimizer)
            if timed:
                run.times.append(seconds)


# --- checks and report --------------------------------------------------------------------

def check_factors(run: Run) -> tuple[bool, str]:
    """Frozen factors bit-identical and without grad; trained factors moved."""
    layers = dict(lora_layers(run.model))
    counts = {"A": 0, "B": 0}
    for name, layer in layers.items():
        for letter, before in zip("AB", run.initial_factors[name]):
            weight = getattr(layer, f"lora_{letter}")["default"].weight
            trained = getattr(run.expected, letter).trainable
            unchanged = torch.equal(weight.detach(), before)
            ok = (not unchanged) if trained else (unchanged and weight.grad is None and not weight.requires_grad)
            counts[letter] += ok
    n = len(layers)
    words = {letter: "changed" if getattr(run.expected, letter).trainable else "unchanged (frozen, no grad)"
             for letter in "AB"}
    passed = n > 0 and counts["A"] == n and counts["B"] == n
    line = (f"check {run.name}: A {words['A']} in {counts['A']}/{n} modules, "
            f"B {words['B']} in {counts['B']}/{n} modules: {'OK' if passed else 'FAILED'}")
    return passed, line


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "CPU"


def header(args: argparse.Namespace, total_params: int, load: tuple[tuple, tuple], timed_seconds: float) -> list[str]:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    fmt = lambda la: "/".join(f"{x:.2f}" for x in la)  # noqa: E731
    return [
        f"- run: {now}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()} with {os.cpu_count()} CPUs, "
        f"threads {args.threads} (torch.get_num_threads() = {torch.get_num_threads()})",
        f"- load average (1/5/15 min) at start {fmt(load[0])}, at end {fmt(load[1])}; "
        f"timed rounds took {timed_seconds:.1f} s of wall time",
        f"- model: Llama, {total_params:,} parameters (hidden {MODEL['hidden_size']}, {MODEL['num_layers']} layers, "
        f"{MODEL['num_heads']} heads / {MODEL['num_kv_heads']} KV heads, intermediate {MODEL['intermediate_size']}, "
        f"vocab {MODEL['vocab_size']}, untied head), float32{' under bf16 autocast' if args.autocast else ''} on {device_name(args.device)}, "
        f"batch {BATCH} x {SEQ_LEN}",
        f"- step: zero_grad + forward + backward + AdamW(lr={LEARNING_RATE}); adapters r={RANK}, alpha={ALPHA} "
        f"on {', '.join(TARGETS)}; {args.warmup} warmup + {args.steps} timed steps per variant, interleaved",
    ]


def table(runs: list[Run]) -> list[str]:
    reference = next(r for r in runs if r.name == REFERENCE)
    ref_median, ref_state = statistics.median(reference.times), reference.state_bytes
    lines = ["| variant | median step (ms) | min - max (ms) | median vs peft LoRA | trainable params | "
             "optimizer state (bytes) | state vs peft LoRA |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        median = statistics.median(run.times)
        share = f"{100 * run.trainable / run.total:.2f}%"
        lines.append(f"| {run.name} | {1000 * median:.1f} | {1000 * min(run.times):.0f} - {1000 * max(run.times):.0f} | {median / ref_median:.3f} | "
                     f"{run.trainable:,} ({share}) | {run.state_bytes:,} | {100 * run.state_bytes / ref_state:.1f}% |")
    return lines


def verdicts(runs: list[Run]) -> list[str]:
    by_name = {r.name: r for r in runs}
    ref, asym = by_name[REFERENCE], by_name[ASYM]
    time_ratio = statistics.median(asym.times) / statistics.median(ref.times)
    state_ratio = asym.state_bytes / ref.state_bytes
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    return [
        f"target: A_rand_hB_zero (fused) median step <= {TARGET_TIME_RATIO:.2f} x peft LoRA: "
        f"{verdict(time_ratio <= TARGET_TIME_RATIO)} ({time_ratio:.3f})",
        f"target: A_rand_hB_zero optimizer state <= {100 * TARGET_STATE_RATIO:.0f}% of peft LoRA: "
        f"{verdict(state_ratio <= TARGET_STATE_RATIO)} ({100 * state_ratio:.1f}%)",
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    total_params = count_parameters(fresh_base())[1]
    print(f"building {len(VARIANTS)} variants of a {total_params:,}-parameter Llama ...", flush=True)
    runs = [build_run(name, args.device) for name in VARIANTS]
    input_ids = make_batch().to(args.device)
    run_rounds(runs, input_ids, args.warmup, timed=False, autocast=args.autocast)
    print(f"timing {args.steps} interleaved rounds ...", flush=True)
    start = time.perf_counter()
    run_rounds(runs, input_ids, args.steps, timed=True, autocast=args.autocast)
    timed_seconds = time.perf_counter() - start
    checks = [check_factors(run) for run in runs if run.expected is not None]
    report = (header(args, total_params, (load_start, os.getloadavg()), timed_seconds) + [""] + table(runs) + [""]
              + [line for _, line in checks] + verdicts(runs))
    emit(report, args.output)
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
