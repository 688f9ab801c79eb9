"""Saving, checking and reloading LoRASYM adapters, ZeRO-3 included.

A save is only trusted after it is read back: every adapted module must have both its
A and its B (a frozen factor is exactly what ZeRO-3 saves tend to drop, docs/design.md,
trap 12) and no tensor may be zero-size (trap 1).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from ..zero import gathered, rank_and_world
from .compact import COMPACT_WEIGHTS, CompactAdapterError, compact_adapter_dir, expanded_tensors, full_adapter_dir, is_compact
from .model import set_recipe_trainability
from .recipe_file import read_recipe_file, record_recipe_on_save

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class AdapterFileError(RuntimeError):
    """A saved adapter that is incomplete or does not fit the model."""


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every parameter that belongs in the adapter file: LoRA factors, trained or frozen,
    and modules_to_save copies."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n}


def peft_file_key(param_name: str) -> str:
    """peft's file key for a parameter: the adapter name dropped.
    '...q_proj.lora_B.default.weight' -> '...q_proj.lora_B.weight';
    '...lm_head.modules_to_save.default.weight' -> '...lm_head.weight'."""
    key = re.sub(r"\.(lora_[AB])\.[^.]+\.(weight|bias)$", r".\1.\2", param_name)
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)


def save_adapter(model: PeftModel, output_dir: str, frozen_as: str = "tensor", **save_kwargs) -> str:
    """Write a complete peft adapter (frozen factors included) plus lorasym.json, then check it.
    `frozen_as="seed"`: then rewrite it compact, frozen random factors as their seeds (adapters/compact.py).

    Under ZeRO-3 every rank must call this: the adapter parameters are gathered (a
    collective) and rank 0 writes.
    """
    params = adapter_parameters(model)
    with gathered(params.values(), modifier_rank=None):
        state = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
    rank, world = rank_and_world()
    if rank == 0:
        model.save_pretrained(output_dir, state_dict=state, **save_kwargs)
        verify_adapter_dir(output_dir)
        if frozen_as == "seed":
            model.lorasym_compacted = compact_adapter_dir(output_dir)
    if world > 1:
        torch.distributed.barrier()
    return output_dir


def verify_adapter_dir(directory: str) -> dict[str, tuple[int, ...]]:
    """Check a saved adapter: both factors of every module, no empty tensor. Returns shapes.
    A compact folder (adapters/compact.py) is checked as its expanded, hash-checked tensors."""
    compact = is_compact(directory)
    weights = os.path.join(directory, COMPACT_WEIGHTS if compact else ADAPTER_WEIGHTS)
    for required in (weights, os.path.join(directory, ADAPTER_CONFIG)):
        if not os.path.exists(required):
            raise AdapterFileError(f"{directory}: no {os.path.basename(required)}; not a peft adapter folder")
    shapes: dict[str, tuple[int, ...]] = {}
    if compact:
        try:
            shapes = {key: tuple(t.shape) for key, t in expanded_tensors(directory).items()}
        except CompactAdapterError as error:
            raise AdapterFileError(str(error)) from None
    else:
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    empty = [k for k, s in shapes.items() if 0 in s or len(s) == 0]
    if empty:
        raise AdapterFileError(
            f"{weights}: {len(empty)} zero-size tensors (e.g. {empty[0]}): saved from ZeRO-3 partitions "
            "without gathering; save with asymllm.save_adapter"
        )
    factors = defaultdict(set)
    for key in shapes:
        for factor in ("lora_A", "lora_B"):
            if f".{factor}." in key:
                factors[key.split(f".{factor}.")[0]].add(factor)
    incomplete = {m: sorted({"lora_A", "lora_B"} - have) for m, have in factors.items() if have != {"lora_A", "lora_B"}}
    if incomplete:
        module, lacking = next(iter(incomplete.items()))
        raise AdapterFileError(
            f"{weights}: {len(incomplete)} modules lack a factor (e.g. {module} has no {lacking[0]}); a frozen "
            "factor was left out (transformers' ZeRO-3 save excludes frozen parameters); save with asymllm.save_adapter"
        )
    if not factors:
        raise AdapterFileError(f"{weights}: holds no LoRA factors")
    return shapes


def load_lorasym_model(base_model: torch.nn.Module, adapter_dir: str, is_trainable: bool = False,
                       adapter_name: str = "default") -> PeftModel:
    """Load an adapter with peft and restore its recipe: the factors train as they did.

    Refuses a file that misses any of the model's adapter tensors (peft alone only warns
    and leaves the missing factor at its random init).
    """
    verify_adapter_dir(adapter_dir)
    with full_adapter_dir(adapter_dir) as full_dir:  # a compact folder: its frozen factors regenerated, hash-checked
        try:
            model = PeftModel.from_pretrained(base_model, full_dir, adapter_name=adapter_name, is_trainable=is_trainable)
        except RuntimeError as error:
            if "size mismatch" not in str(error):
                raise
            first = next(line.strip() for line in str(error).splitlines() if "size mismatch" in line)
            raise AdapterFileError(f"{adapter_dir}: the adapter does not fit this base model ({first})") from None
        _check_no_missing_keys(model, full_dir, adapter_name)
    record = read_recipe_file(adapter_dir)
    if record is not None:
        recipe, seed = record
        model.lorasym_recipe, model.lorasym_seed = recipe, seed
        if is_trainable:
            set_recipe_trainability(model, recipe, adapter_name)
        record_recipe_on_save(model)
    return model


def _check_no_missing_keys(model: PeftModel, adapter_dir: str, adapter_name: str) -> None:
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    with safe_open(os.path.join(adapter_dir, ADAPTER_WEIGHTS), framework="pt") as f:
        present = set(f.keys())
    missing = sorted(expected - present)
    if missing:
        raise AdapterFileError(
            f"{adapter_dir}: {len(missing)} adapter tensors the model expects are not in the file "
            f"(e.g. {missing[0]}); the adapter was saved for another model or is incomplete"
        )


def adapter_base_model(adapter_dir: str) -> str | None:
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        return json.load(f).get("base_model_name_or_path")
