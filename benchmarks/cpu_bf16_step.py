"""One training step of the built-in model in three precisions, interleaved in one run (issue 12).

    python benchmarks/cpu_bf16_step.py [--rounds 6]

fp32 (asymllm's default on CPU), bf16 autocast with fp32 weights (`--cpu_autocast_bf16 true`),
and bf16 autocast with the frozen base stored in bf16 (adapter fp32; not an asymllm option:
measured to see whether dropping the per-step weight casts would pay). SmolLM2-135M-Instruct,
A_rand_hB_zero r=16, batches of 8 built-in examples, forward + backward + AdamW; the first
round is warm-up. What it shows is the ceiling of bf16 on this CPU for this workload.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from asymllm import LoRASYMConfig, get_lorasym_model  # noqa: E402
from asymllm.builtin import DEFAULT_MODEL, resolve_model  # noqa: E402
from asymllm.data import BUILTIN_DATASET, load_examples  # noqa: E402
from asymllm.tokenizer import ensure_chat_template, ensure_pad_token  # noqa: E402
from asymllm.training.tokenize import tokenize_examples  # noqa: E402

VARIANTS = ("fp32", "bf16 autocast", "bf16 autocast, bf16 frozen base")


def batches(tokenizer, n: int, size: int = 8) -> list[dict]:
    examples, _ = load_examples(BUILTIN_DATASET)
    dataset, _ = tokenize_examples(examples[: n * size], tokenizer, 512)
    out = []
    for i in range(n):
        rows = [dataset[j] for j in range(i * size, (i + 1) * size)]
        width = max(len(r["input_ids"]) for r in rows)
        pad = [width - len(r["input_ids"]) for r in rows]
        out.append({"input_ids": torch.tensor([r["input_ids"] + [tokenizer.pad_token_id] * p for r, p in zip(rows, pad)]),
                    "labels": torch.tensor([r["labels"] + [-100] * p for r, p in zip(rows, pad)]),
                    "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * p for r, p in zip(rows, pad)])})
    return out


def build(path: str, variant: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model = get_lorasym_model(model, LoRASYMConfig(recipe="A_rand_hB_zero", r=16, seed=0))
    if variant.endswith("bf16 frozen base"):
        for name, param in model.named_parameters():
            if "lora_" not in name:
                param.data = param.data.to(torch.bfloat16)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    path = resolve_model(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_chat_template(tokenizer), ensure_pad_token(tokenizer)
    data = batches(tokenizer, args.rounds)
    built = {v: build(path, v) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds):
        for variant in VARIANTS[round_ % 3:] + VARIANTS[: round_ % 3]:  # the order rotates each round
            model, optimizer = built[variant]
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant != "fp32"):
                loss = model(**data[round_]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if round_:
                times[variant].append(time.perf_counter() - start)
    fp32 = statistics.median(times["fp32"])
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.rounds - 1} timed steps per variant\n")
    print("| variant | median step (s) | speed vs fp32 |\n|---|---:|---:|")
    for variant in VARIANTS:
        median = statistics.median(times[variant])
        print(f"| {variant} | {median:.3f} | {fp32 / median:.3f}x |")


if __name__ == "__main__":
    main()
