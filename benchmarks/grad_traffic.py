"""Gradient traffic per step on 2 CPU ranks: asymllm A_rand_hB_zero vs peft LoRA at r=16 (issue 29).

Run from the repository root:

    python benchmarks/grad_traffic.py [--model DIR] [--output FILE]

Only trained parameters' gradients are reduced between ranks, so an adapter whose A is frozen
should send half of LoRA's bytes. Measured, not computed, on 2 processes (gloo), one training
step of batch 2 x 64 per rank on the built-in SmolLM2-135M-Instruct with adapters on the 7
projections:

- DDP: a communication hook (`register_comm_hook`) adds up the bytes of every gradient bucket
  it all-reduces, then all-reduces it as the default hook does;
- ZeRO-2 and ZeRO-3 (`deepspeed.initialize`): DeepSpeed's comms logger (`comms_logger`, every
  op profiled) records each collective's message size; the table sums them per operation.
  ZeRO-3 also all-gathers the (frozen) base weights every step; those are listed apart, as
  they are the same for both adapters.

Bytes are exact and the same on every run (no timing is involved), so one run suffices.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
from collections import defaultdict

from _report import emit  # benchmarks/_report.py (a script's own folder is on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {"asym": "asymllm A_rand_hB_zero r=16", "lora": "peft LoRA r=16"}
MODES = ("ddp", "zero2", "zero3")
BATCH, LENGTH = 2, 64


def build(variant: str, model_dir: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from asymllm import LoRASYMConfig, get_lorasym_model

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if variant == "asym":
        return get_lorasym_model(model, LoRASYMConfig(recipe="A_rand_hB_zero", r=16, lora_alpha=32, target_modules=TARGETS))
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"))


def batch(rank: int, vocab: int):
    import torch

    return torch.randint(0, vocab, (BATCH, LENGTH), generator=torch.Generator().manual_seed(rank))


def ddp_bytes(variant: str, model_dir: str) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    dist.init_process_group("gloo")
    model = build(variant, model_dir)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    counted = defaultdict(int)

    def counting_allreduce(state, bucket):
        counted["all_reduce (gradient buckets)"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(dist.group.WORLD, counting_allreduce)
    ids = batch(dist.get_rank(), model.config.vocab_size)
    ddp(input_ids=ids, labels=ids).loss.backward()
    return dict(counted)


def zero_bytes(variant: str, model_dir: str, stage: int) -> dict:
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo")
    model = build(variant, model_dir)
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
              "comms_logger": {"enabled": True, "verbose": False, "prof_all": True, "debug": False}}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    from deepspeed.comm import comm as ds_comm

    ds_comm.comms_logger.comms_dict.clear()  # the step only, not the set-up's broadcasts
    ids = batch(torch.distributed.get_rank(), model.config.vocab_size)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return {op: sum(size * record[0] for size, record in sizes.items())
            for op, sizes in ds_comm.comms_logger.comms_dict.items()}


def worker(mode: str, variant: str, out: str, model_dir: str) -> None:
    import torch

    torch.set_num_threads(1)
    counted = ddp_bytes(variant, model_dir) if mode == "ddp" else zero_bytes(variant, model_dir, int(mode[-1]))
    if int(os.environ["RANK"]) == 0:
        with open(out, "w") as f:
            json.dump({"bytes": counted}, f)


def launch(mode: str, variant: str, model_dir: str, workdir: str) -> dict:
    out = os.path.join(workdir, f"{mode}-{variant}.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), os.path.abspath(__file__), "--worker", mode, variant, out, "--model", model_dir]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{mode} {variant} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    with open(out) as f:
        return json.load(f)["bytes"]


def is_gradient_op(op: str) -> bool:
    return "all_gather" not in op and "broadcast" not in op and "barrier" not in op


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--workdir", default="/tmp/asymllm-grad-traffic")
    p.add_argument("--output")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from asymllm.builtin import resolve_model

    model_dir = args.model or resolve_model(None)
    if args.worker:
        worker(*args.worker, model_dir)
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    rows = ["| setup | operation | asymllm A_rand_hB_zero r=16 (bytes) | peft LoRA r=16 (bytes) | asym / LoRA |",
            "|---|---|---:|---:|---:|"]
    for mode in MODES:
        measured = {v: launch(mode, v, model_dir, args.workdir) for v in VARIANTS}
        ops = sorted(set(measured["asym"]) | set(measured["lora"]), key=lambda op: not is_gradient_op(op))
        totals = {v: sum(b for op, b in measured[v].items() if is_gradient_op(op)) for v in VARIANTS}
        for op in ops:
            a, b = measured["asym"].get(op, 0), measured["lora"].get(op, 0)
            rows.append(f"| {mode} | {op}{'' if is_gradient_op(op) else ' (parameters, not gradients)'} | {a:,} | {b:,} | "
                        f"{a / b if b else float('nan'):.3f} |")
        rows.append(f"| {mode} | **gradient traffic, all ops** | {totals['asym']:,} | {totals['lora']:,} | "
                    f"**{totals['asym'] / totals['lora']:.3f}** |")
        print("\n".join(rows[-len(ops) - 1:]), flush=True)
    import deepspeed
    import torch

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    emit([f"- run: {now}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, Python "
                      f"{platform.python_version()}, {platform.machine()} with {os.cpu_count()} CPUs; model {model_dir}; "
                      f"2 gloo ranks, batch {BATCH} x {LENGTH} per rank, one step, float32", "", *rows], args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
