"""Where one training step's time goes, op by op: peft LoRA vs asymllm A_rand_hB_zero (issue 29).

Run from the repository root:

    python benchmarks/step_profile.py [--batch 8 --length 50 --steps 5 --threads 2] [--output FILE]

The model alone, outside any Trainer: the built-in SmolLM2-135M-Instruct, float32, sdpa, random
token ids (batch 8 x 50 by default: the built-in data's batch and length), zero_grad + forward
with labels + backward + AdamW, adapters r=16 (alpha 32) on the 7 projections. Variants:

- frozen base: every parameter frozen, the embedding output requiring grad (backward runs through
  every layer, no weight gradient, no optimizer): the floor an adapter adds to;
- peft LoRA r=16;
- asymllm A_rand_hB_zero r=16 (peft forward): `fuse_frozen_a=False`;
- asymllm A_rand_hB_zero r=16: the default fused frozen-A path (asymllm/adapters/fused.py).

Each variant: 3 warm-up steps, `--steps` timed steps (mean), then torch.profiler over `--steps`
more. The table gives each operator's self CPU time per step for every variant (the 14 largest
in peft LoRA's step, then the rest), so the difference between two columns is where one step is
faster than the other. Profiling adds its own overhead; the timed steps are measured without it.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import defaultdict

import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

from asymllm import LoRASYMConfig, get_lorasym_model
from asymllm.builtin import resolve_model

from _report import emit  # benchmarks/_report.py (a script's own folder is on sys.path)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
LORA = "peft LoRA r=16"
VARIANTS = ["frozen base", LORA, "asym (peft forward)", "asym (fused)"]
TOP = 14

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=50)
    p.add_argument("--steps", type=int, default=5, help="timed steps, and profiled steps, per variant (default 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", help="also write the markdown report to this file")
    return p.parse_args(argv)


def build(variant: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(resolve_model(None), attn_implementation="sdpa").train()
    torch.manual_seed(0)
    if variant == "frozen base":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if variant == LORA:
        return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM"))
    config = LoRASYMConfig(recipe="A_rand_hB_zero", r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                           fuse_frozen_a=variant == "asym (fused)")
    return get_lorasym_model(model, config)


def stepper(model: torch.nn.Module, ids: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        if optimizer is not None:
            optimizer.step()
    return step


def measure(variant: str, ids: torch.Tensor, steps: int) -> tuple[float, dict[str, float]]:
    """(seconds per step, {operator: self CPU ms per step})."""
    step = stepper(build(variant), ids)
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = defaultdict(float)
    for event in prof.key_averages():
        ops[event.key] += event.self_cpu_time_total / 1000 / steps
    return seconds, dict(ops)


def report(args, results: dict) -> list[str]:
    lora_ops = results[LORA][1]
    top = sorted(lora_ops, key=lambda k: -lora_ops[k])[:TOP]
    extra = sorted({k for _, ops in results.values() for k in ops} - set(top),
                   key=lambda k: -max(ops.get(k, 0.0) for _, ops in results.values()))[:6]
    lines = [f"- model: SmolLM2-135M-Instruct, float32, sdpa, batch {args.batch} x {args.length}, "
             f"{args.threads} threads, torch {torch.__version__}; {args.steps} timed + {args.steps} profiled steps per variant",
             "",
             "| | " + " | ".join(VARIANTS) + " |",
             "|---|" + "---:|" * len(VARIANTS),
             "| step, unprofiled (ms) | " + " | ".join(f"{1000 * results[v][0]:.0f}" for v in VARIANTS) + " |",
             "| vs peft LoRA | " + " | ".join(f"{results[v][0] / results[LORA][0]:.3f}" for v in VARIANTS) + " |",
             "| profiled self CPU total (ms) | " + " | ".join(f"{sum(results[v][1].values()):.0f}" for v in VARIANTS) + " |"]
    for key in top + extra:
        lines.append(f"| {key} | " + " | ".join(f"{results[v][1].get(key, 0.0):.1f}" for v in VARIANTS) + " |")
    rest = lambda v: sum(ms for k, ms in results[v][1].items() if k not in top + extra)  # noqa: E731
    lines.append("| all other operators | " + " | ".join(f"{rest(v):.1f}" for v in VARIANTS) + " |")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 49152, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    results = {}
    for variant in VARIANTS:
        print(f"{variant} ...", flush=True)
        results[variant] = measure(variant, ids, args.steps)
    emit(report(args, results), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
