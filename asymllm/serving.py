"""How to serve what asymllm writes: the vLLM commands, for the model cards.

vLLM serves an unmerged adapter only with `--max-lora-rank` set to one of a fixed list of
values at least the adapter's rank (vllm/config/lora.py, `MaxLoRARanks`); a rank between
two of them must be rounded up, and one above the largest cannot be served as a LoRA (merge
it: `asymllm export`, then `vllm serve DIR`). vLLM is not installable on these machines, so
the commands are stated, not run.
"""

from __future__ import annotations

import shlex

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(r: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that holds rank r; None above its largest."""
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= r), None)


def vllm_adapter_command(base: str, name: str, adapter_dir: str, r: int) -> str:
    """`vllm serve BASE --enable-lora --lora-modules NAME=DIR --max-lora-rank R`, or why it cannot."""
    rank = vllm_max_lora_rank(r)
    if rank is None:
        return (f"# rank {r} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}): merge it "
                "(asymllm export) and serve the merged folder")
    return (f"vllm serve {shlex.quote(base)} --enable-lora --lora-modules {shlex.quote(f'{name}={adapter_dir}')} "
            f"--max-lora-rank {rank}")


def vllm_merged_command(folder: str) -> str:
    return f"vllm serve {shlex.quote(folder)}"
