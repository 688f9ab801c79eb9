"""Adapter file size at r=16 on SmolLM2-135M: asymllm compact vs full vs peft LoRA (issue 29).

Run from the repository root:

    python benchmarks/adapter_size.py [--output FILE]

Saves, from the built-in model with adapters on the 7 projections, r=16:
- peft LoRA: `get_peft_model(LoraConfig(r=16)).save_pretrained` (what TRL + peft writes);
- asymllm A_rand_hB_zero, full: `asymllm.save_adapter` (the default, `--save_frozen_as tensor`);
- asymllm A_rand_hB_zero, compact: `save_adapter(frozen_as="seed")` (`--save_frozen_as seed`),
  then reloads it (regenerating and hash-checking every A) and checks it equals the full one.
Sizes are the bytes of every file of the adapter folder (no tokenizer); exact, so one run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from asymllm import LoRASYMConfig, get_lorasym_model, save_adapter
from asymllm.adapters.compact import expanded_tensors
from asymllm.builtin import resolve_model
from safetensors.torch import load_file

from _report import emit  # benchmarks/_report.py (a script's own folder is on sys.path)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output")
    args = p.parse_args(argv)
    model_dir = resolve_model(None)
    with tempfile.TemporaryDirectory() as root:
        lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                              LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
        lora.save_pretrained(os.path.join(root, "lora"))
        asym = get_lorasym_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                 LoRASYMConfig(recipe="A_rand_hB_zero", r=16, lora_alpha=32, target_modules=TARGETS))
        save_adapter(asym, os.path.join(root, "full"))
        save_adapter(asym, os.path.join(root, "compact"), frozen_as="seed")
        full = load_file(os.path.join(root, "full", "adapter_model.safetensors"))
        expanded = expanded_tensors(os.path.join(root, "compact"))
        same = full.keys() == expanded.keys() and all(torch.equal(full[k], expanded[k]) for k in full)
        sizes = {name: folder_bytes(os.path.join(root, name)) for name in ("lora", "full", "compact")}
    labels = {"lora": "peft LoRA r=16 (save_pretrained)", "full": "asymllm A_rand_hB_zero r=16, full (default)",
              "compact": "asymllm A_rand_hB_zero r=16, compact (--save_frozen_as seed)"}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [f"- run: {now}, torch {torch.__version__}; model {model_dir}; float32 adapters on {', '.join(TARGETS)}", "",
             "| adapter folder | bytes | vs peft LoRA |", "|---|---:|---:|"]
    lines += [f"| {labels[n]} | {b:,} | {b / sizes['lora']:.3f} |" for n, b in sizes.items()]
    lines += ["", f"compact adapter expands to the full one, tensor for tensor: {'OK' if same else 'FAILED'}"]
    emit(lines, args.output)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
