"""What every part of `asymllm export` shares: its error, the dtypes it writes, the peft key
prefix and the file names of a sharded checkpoint, and a small file helper."""

from __future__ import annotations

import os

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
PREFIX = "base_model.model."
WEIGHTS_INDEX = "model.safetensors.index.json"


class ExportError(RuntimeError):
    """An export that cannot be done as asked; the message names the flag or file and what to do."""


def write_text(directory: str, name: str, text: str) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)
