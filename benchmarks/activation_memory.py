"""Activation memory of one training step: asymllm A_rand_hB_zero vs peft LoRA (issue 29).

Run from the repository root:

    python benchmarks/activation_memory.py [--lengths 1024,2048 --batch 4] [--output FILE]

One training step (forward with labels, backward, AdamW) of the built-in SmolLM2-135M-Instruct
(float32, sdpa, random token ids, batch 4 x max_length), each in a fresh process, for:

- asymllm A_rand_hB_zero r=16 (the fused frozen-A path, the default);
- peft LoRA r=16 (`peft.get_peft_model(LoraConfig(r=16, lora_alpha=32))`): equal rank;
- peft LoRA r=8: about equal trainable parameters (8 (d_in + d_out) per module, 81,408 per
  layer, against B-only r=16's 16 d_out, 82,944 per layer; the table gives the counts);

with and without activation checkpointing (non-reentrant, as `--gradient_checkpointing` runs
it), on the 7 projections. Per run:
- saved activations (MiB): the bytes autograd keeps for backward, counted exactly with
  `torch.autograd.graph.saved_tensors_hooks` during the forward (distinct storages, parameters
  excluded); without checkpointing only (checkpointing installs hooks of its own);
- step peak RSS (MiB): VmHWM during the step minus RSS before it (the peak reset at the
  start of the step through /proc/self/clear_refs), i.e. what the step adds to the process;
- peak RSS (MiB): the process's high-water mark during the step.
With `--device cuda` (benchmarks/gpu_check.sh runs it when a GPU is there) the step peak is
`torch.cuda.max_memory_allocated` during the step minus the memory allocated before it, and the
peak column the maximum itself.
The ratio columns divide by peft LoRA r=16 in the same setting. RSS counts what glibc keeps after
frees, so read RSS ratios as about +-50 MiB; the saved-activation bytes have no noise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

from _report import emit  # benchmarks/_report.py (a script's own folder is on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"asym16": "asymllm A_rand_hB_zero r=16", "lora16": "peft LoRA r=16", "lora8": "peft LoRA r=8 (equal params)"}
REFERENCE = "lora16"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="1024,2048", help="max_length values (default 1024,2048)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--checkpointing", default="off,on", help="activation checkpointing settings to run (default off,on)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: GPU memory (max_memory_allocated)")
    p.add_argument("--output", help="also write the markdown report to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.checkpointing = [{"off": False, "on": True}[x] for x in args.checkpointing.split(",")]
    return args


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def one_step(variant: str, length: int, batch: int, checkpointing: bool, device: str = "cpu") -> dict:
    """In this (fresh) process: build the model, run one step, report memory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from asymllm import LoRASYMConfig, count_parameters, get_lorasym_model
    from asymllm.builtin import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.float32, attn_implementation="sdpa")
    if variant == "asym16":
        model = get_lorasym_model(model, LoRASYMConfig(recipe="A_rand_hB_zero", r=16, lora_alpha=32, target_modules=TARGETS))
    else:
        r = 16 if variant == "lora16" else 8
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 1024
    else:
        before = rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    if checkpointing:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    else:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1024 if cuda else rss_kib("VmHWM")
    return {"saved_mib": sum(saved.values()) / 2**20 if not checkpointing else None,
            "step_peak_mib": (peak - before) / 1024, "peak_mib": peak / 1024, "seconds": seconds,
            "trainable": count_parameters(model)[0], "path": getattr(model, "lorasym_adapter_path", "peft's LoRA forward")}


def run_config(variant, length, batch, checkpointing, threads, device="cpu") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    spec = json.dumps([variant, length, batch, checkpointing, device])
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", spec, "--threads", str(threads)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} {length} ckpt={checkpointing} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(one_step(*json.loads(args.one))))
        return 0
    started, load = time.perf_counter(), os.getloadavg()
    rows = []
    for checkpointing in args.checkpointing:
        for length in args.lengths:
            results = {v: run_config(v, length, args.batch, checkpointing, args.threads, args.device) for v in VARIANTS}
            ref = results[REFERENCE]
            for v, r in results.items():
                saved = "-" if r["saved_mib"] is None else f"{r['saved_mib']:.0f} ({r['saved_mib'] / ref['saved_mib']:.3f})"
                rows.append(f"| {args.batch} x {length} | {'on' if checkpointing else 'off'} | {VARIANTS[v]} | {r['trainable']:,} | "
                            f"{saved} | {r['step_peak_mib']:.0f} ({r['step_peak_mib'] / ref['step_peak_mib']:.3f}) | "
                            f"{r['peak_mib']:.0f} ({r['peak_mib'] / ref['peak_mib']:.3f}) | {r['seconds']:.1f} |")
                print(rows[-1], flush=True)
    import peft
    import torch
    import transformers

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    memory = "CUDA allocated" if args.device == "cuda" else "RSS"
    report = [f"- run: {now}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
              f"Python {platform.python_version()}, {platform.machine()} with {os.cpu_count()} CPUs, {args.threads} threads; "
              f"load average at start {'/'.join(f'{x:.2f}' for x in load)}; took {(time.perf_counter() - started) / 60:.1f} min",
              "- SmolLM2-135M-Instruct (built-in), float32, sdpa, one step (forward + backward + AdamW), random tokens; "
              "adapters on q, k, v, o, gate, up, down; ratios to peft LoRA r=16 in the same row group", "",
              "| batch x length | activation checkpointing | variant | trainable params | saved activations MiB (vs LoRA r=16) | "
              f"step peak {memory} MiB (vs LoRA r=16) | peak {memory} MiB (vs LoRA r=16) | step s |",
              "|---|---|---|---:|---:|---:|---:|---:|", *rows]
    emit(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
