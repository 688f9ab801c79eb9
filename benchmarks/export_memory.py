"""Peak resident memory of `asymllm export` over the size of the model it writes.

Every export runs as `asymllm export ...` in a child process, which prints its own VmHWM (peak
resident set) as it exits, so nothing the parent holds counts (see CHILD). Two models:

- SmolLM2-135M-Instruct (the built-in conversion, fp32 on disk, one 538 MB file) with an
  A_rand_hB_zero r=16 adapter on all seven projections (get_lorasym_model, random B, save_adapter);
- a synthetic ~1B-parameter Llama (hidden 2048, 20 layers, intermediate 5632, vocab 32000,
  untied head) written here in bf16, in 1 GB shards, with a random r=16 adapter; removed at the end.

Each is exported to bf16 and to fp32 with --no-verify (the merge alone: what the 1.3x target is
about); the small one also with verification on (which loads the merged model, then base + adapter).
A child that only imports what the export imports gives the process's fixed cost.

    . .venv/bin/activate
    python benchmarks/export_memory.py                     # both models (~5 min on 2 loaded cores)
    python benchmarks/export_memory.py --skip-1b --output /tmp/export_memory.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

IMPORTS_ONLY = ("import torch, transformers, safetensors; import asymllm.export.command; import peft.utils.other; "
                "from transformers import AutoTokenizer, AutoModelForCausalLM")
# The child reports its own VmHWM (peak RSS of its process image) as it exits. Not the parent's
# ru_maxrss from wait4: at exec the kernel folds the old address space's high-water mark into the
# child's maxrss, and with vfork that is the *parent's* (measured: a parent that had written the
# 1B model made every child "peak" at 2.4 GiB, while the export itself peaked at 0.7 GiB).
CHILD = ("import atexit, sys\n"
         "def hwm():\n"
         "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
         "    print(f'VMHWM_KB={line.split()[1]}', flush=True)\n"
         "atexit.register(hwm)\n"
         "if sys.argv[1] == 'imports':\n"
         f"    {IMPORTS_ONLY}\n"
         "else:\n"
         "    from asymllm.cli import main\n"
         "    main(sys.argv[1:])\n")


def run_child(args: list[str]) -> tuple[float, float, str]:
    """(peak RSS in bytes, wall seconds, output) of `asymllm <args>` (or 'imports') in a child."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise SystemExit(f"child failed ({completed.returncode}): asymllm {' '.join(args)}\n{output[-4000:]}")
    peak_kb = int(next(line for line in completed.stdout.splitlines() if line.startswith("VMHWM_KB=")).split("=")[1])
    return peak_kb * 1024, seconds, output


def folder_bytes(directory: str, suffix: str = ".safetensors") -> list[int]:
    return [os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if n.endswith(suffix)]


# ---- the two models and their adapters


def smollm2_case(work: str) -> tuple[str, str]:
    from transformers import AutoModelForCausalLM

    from asymllm import LoRASYMConfig, get_lorasym_model, save_adapter
    from asymllm.tiny import randomize_lora_B
    from asymllm.builtin import builtin_model_dir

    base = builtin_model_dir()
    model = get_lorasym_model(AutoModelForCausalLM.from_pretrained(base),
                              LoRASYMConfig(recipe="A_rand_hB_zero", r=16, lora_alpha=32, seed=7))
    randomize_lora_B(model, std=0.01, seed=0)
    adapter = os.path.join(work, "smollm2_adapter")
    save_adapter(model, adapter)
    return base, adapter


def synthetic_1b_case(work: str, shard_bytes: int = 10**9) -> tuple[str, str]:
    """Config, bf16 shards + index, tokenizer, generation config; and an r=16 adapter file."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from asymllm.tiny import tiny_tokenizer

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    base = os.path.join(work, "synthetic_1b")
    os.makedirs(base)
    generator = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        tensor = torch.ones(shape, dtype=torch.bfloat16) if key.endswith("norm.weight") else \
            torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
        n = tensor.numel() * 2
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = tensor, size + n
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(base, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(math.prod(s) for s in shapes.values())
    with open(os.path.join(base, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, f)
    config.save_pretrained(base)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)  # a tokenizer to copy; its vocabulary is not the model's (no verification)

    adapter = os.path.join(work, "synthetic_1b_adapter")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    factors = {}
    for key, shape in shapes.items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in targets:
            d_out, d_in = shape
            factors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(16, d_in, generator=generator) / d_in ** 0.5
            factors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(d_out, 16, generator=generator) * 0.01
    os.makedirs(adapter)
    save_file(factors, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM")
    lora.base_model_name_or_path = base
    lora.save_pretrained(adapter)
    return base, adapter


# ---- measuring


def measure(name: str, base: str, adapter: str, work: str, dtype: str, verify: bool, baseline: float) -> dict:
    out = os.path.join(work, f"out_{name}_{dtype}_{'verify' if verify else 'noverify'}")
    command = ["export", "--adapter", adapter, "--output", out, "--dtype", dtype]
    if not verify:
        command.append("--no-verify")
    peak, seconds, log = run_child(command)
    size = sum(folder_bytes(out))
    shard = max(folder_bytes(base))
    verification = next((line.split("verification ", 1)[1] for line in log.splitlines()
                         if line.startswith("verification ")), None)
    shutil.rmtree(out)
    row = {"model": name, "dtype": dtype, "verify": verify, "seconds": seconds, "peak_rss": peak,
           "model_bytes": size, "largest_base_shard": shard, "baseline_rss": baseline,
           "ratio": peak / size, "ratio_above_baseline": (peak - baseline) / size,
           "target": 1.3 * size + shard, "verification": verification}
    print(f"  {name} {dtype} verify={verify}: peak {peak / 2**30:.2f} GiB, model {size / 2**30:.2f} GiB, "
          f"{seconds:.0f} s", flush=True)
    return row


def report(rows: list[dict], header: list[str]) -> str:
    lines = header + ["", "| model | out dtype | verify | wall (s) | peak RSS (GiB) | merged size (GiB) | peak / size | "
                      "(peak - imports) / size | target 1.3 x size + shard (GiB) | within target |",
                      "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        within = "yes" if r["peak_rss"] <= r["target"] else "NO"
        if r["verify"]:
            within += " (not bound: holds one model)"
        lines.append(f"| {r['model']} | {r['dtype']} | {'on' if r['verify'] else 'off'} | {r['seconds']:.0f} | "
                     f"{r['peak_rss'] / 2**30:.2f} | {r['model_bytes'] / 2**30:.2f} | {r['ratio']:.2f} | "
                     f"{r['ratio_above_baseline']:.2f} | {r['target'] / 2**30:.2f} | {within} |")
    checks = [f"verification ({r['model']} {r['dtype']}): {r['verification']}" for r in rows if r["verification"]]
    return "\n".join(lines + [""] + checks) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-1b", action="store_true", help="only SmolLM2-135M")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new one under /tmp; removed)")
    parser.add_argument("--output", help="also write the report here")
    args = parser.parse_args(argv)
    import transformers

    start, load_start = time.perf_counter(), os.getloadavg()
    work = tempfile.mkdtemp(prefix="export_memory.", dir=args.workdir)
    rows = []
    try:
        baseline, _, _ = run_child(["imports"])
        print(f"imports only: peak {baseline / 2**30:.2f} GiB", flush=True)
        base, adapter = smollm2_case(work)
        for dtype, verify in (("bf16", False), ("fp32", False), ("bf16", True), ("fp32", True)):
            rows.append(measure("SmolLM2-135M", base, adapter, work, dtype, verify, baseline))
        if not args.skip_1b:
            t = time.perf_counter()
            base, adapter = synthetic_1b_case(work)
            n_params = json.load(open(os.path.join(base, "model.safetensors.index.json")))["metadata"]["total_size"] // 2
            print(f"synthetic model: {n_params:,} parameters written in {time.perf_counter() - t:.0f} s", flush=True)
            for dtype in ("bf16", "fp32"):
                rows.append(measure(f"synthetic Llama {n_params / 1e9:.2f}B", base, adapter, work, dtype, False, baseline))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = [
        f"- run: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()} with {os.cpu_count()} CPUs",
        f"- load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load_start)}, at end "
        f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}; whole benchmark {time.perf_counter() - start:.0f} s",
        f"- a child that only imports what the export imports peaks at {baseline / 2**30:.2f} GiB ('imports' below)",
    ]
    text = report(rows, header)
    print("\n" + text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
