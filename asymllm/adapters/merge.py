"""Merging an adapter into its base: W <- W0 + s * B @ A, then plain transformers modules."""

from __future__ import annotations

import torch
from peft import PeftModel

from ..zero import is_partitioned


class MergeError(RuntimeError):
    pass


def merge_lorasym(model: PeftModel) -> torch.nn.Module:
    """Fold every adapter into its base weight and return the plain base model.

    Refused under ZeRO-3 (the local weights are empty partitions, docs/design.md, trap 2):
    save the adapter and merge from the files with `asymllm export` instead.
    """
    if not isinstance(model, PeftModel):
        raise MergeError(f"expected a peft PeftModel, got {type(model).__name__}; was the adapter already merged?")
    if any(is_partitioned(p) for p in model.parameters()):
        raise MergeError(
            "cannot merge a ZeRO-3 partitioned model in place; save the adapter (asymllm.save_adapter) "
            "and run `asymllm export --adapter DIR --output DIR`"
        )
    return model.merge_and_unload(safe_merge=True)
