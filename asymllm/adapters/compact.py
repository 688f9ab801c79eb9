"""Compact adapters: a frozen random factor stored as how to make it, not as its numbers.

A frozen `rand`, `he` or `zero` factor is a function of (init, seed, shape): `asymllm train
--save_frozen_as seed` writes it as that recipe plus the sha256 of its bytes, which halves an
`A_rand_hB_zero` adapter. Loading regenerates each factor and compares the hash, so another
torch version's generator (or a tampered record) is an error naming the module, never a
silently different adapter (peft keeps VeRA's projections in the file for that fear).

The folder is not a peft adapter on purpose: its weights file has another name, so plain
peft finds no adapter_model.safetensors and stops (with a hub "Repo id must be ..." error)
instead of loading B beside a freshly initialised A; the folder's model card says what it is
and how to convert it. asymllm reads it everywhere an adapter folder is taken (eval, chat,
export); `asymllm export --format peft` writes the standard full adapter from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from .init import init_factor, module_seed
from .recipe_file import read_recipe_file

logger = logging.getLogger(__name__)

FULL_WEIGHTS = "adapter_model.safetensors"
COMPACT_WEIGHTS = "adapter_model.compact.safetensors"
FROZEN_RECORD = "lorasym_frozen.json"
REGENERABLE_INITS = ("rand", "he", "zero")  # V and U need the base's SVD: kept as tensors
SAVE_FROZEN_AS = ("tensor", "seed")


class CompactAdapterError(RuntimeError):
    """A compact adapter whose frozen factors cannot be regenerated exactly."""


def is_compact(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, FROZEN_RECORD))


def tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()).hexdigest()


def compact_adapter_dir(directory: str) -> dict:
    """Rewrite a saved full adapter folder as a compact one. Returns what it did (for the log):
    {"regenerated": N, "kept": M, "bytes_before": ..., "bytes_after": ...}."""
    record = read_recipe_file(directory)
    if record is None:
        raise CompactAdapterError(f"{directory}: no lorasym.json, so no recipe or seed to regenerate frozen factors from")
    recipe, seed = record
    full_path = os.path.join(directory, FULL_WEIGHTS)
    tensors = load_file(full_path)
    frozen, kept = {}, {}
    for key, tensor in tensors.items():
        entry = _regeneration_entry(key, tensor, tensors, recipe, seed)
        if entry:
            frozen[key] = entry
        else:
            kept[key] = tensor
    bytes_before = os.path.getsize(full_path)
    save_file(kept, os.path.join(directory, COMPACT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, FROZEN_RECORD), "w") as f:
        json.dump({"format": "asymllm compact adapter: the tensors below are regenerated from (init, seed, shape) and "
                             "checked against sha256; `asymllm export --adapter THIS --format peft` writes a plain peft adapter",
                   "torch": torch.__version__, "recipe": recipe.name, "seed": seed, "factors": frozen}, f, indent=1)
    os.remove(full_path)
    expanded_tensors(directory)  # the folder just written must read back, hash for hash
    _say_so_in_the_card(directory)
    done = {"regenerated": len(frozen), "kept": len(kept), "bytes_before": bytes_before,
            "bytes_after": os.path.getsize(os.path.join(directory, COMPACT_WEIGHTS)) + os.path.getsize(os.path.join(directory, FROZEN_RECORD))}
    logger.info(compact_summary(done, directory))
    return done


COMPACT_NOTICE = """> **A compact asymllm adapter.** Its frozen factors are stored as init, seed, shape and sha256
> (lorasym_frozen.json), not as tensors, so plain peft cannot load this folder: `PeftModel.from_pretrained`
> finds no adapter_model.safetensors and stops with "Repo id must be in the form ...". asymllm loads it
> (eval, chat, export), regenerating each factor and checking its hash. For a standard peft adapter run
> `asymllm export --adapter THIS_FOLDER --output OUT --format peft`.
"""


def _say_so_in_the_card(directory: str) -> None:
    """peft's model card, with the notice above its first heading: the card is what a hub page
    or a user opening the folder reads first, and peft's own error does not say what to do."""
    path = os.path.join(directory, "README.md")
    card = open(path).read() if os.path.isfile(path) else ""
    front, body = "", card
    if card.startswith("---\n") and "\n---\n" in card[4:]:
        end = card.index("\n---\n", 4) + len("\n---\n")
        front, body = card[:end], card[end:]
    with open(path, "w") as f:
        f.write(front + "\n" + COMPACT_NOTICE + "\n" + body.lstrip("\n"))


def compact_summary(done: dict, directory: str) -> str:
    return (f"adapter saved compact (--save_frozen_as seed): {done['regenerated']} frozen factors as seeds + sha256, "
            f"{done['kept']} tensors kept; {done['bytes_before']:,} -> {done['bytes_after']:,} bytes "
            f"({done['bytes_after'] / done['bytes_before']:.3f}x); plain peft: asymllm export --adapter {directory} "
            "--output FOLDER --format peft")


def _regeneration_entry(key: str, tensor: torch.Tensor, tensors: dict, recipe, seed: int) -> dict | None:
    """How to regenerate this tensor, if it is a frozen factor whose init needs no base weight
    and the saved bytes are exactly what that init gives (else None: it stays a tensor)."""
    for letter in "AB":
        marker = f".lora_{letter}.weight"
        if not key.endswith(marker):
            continue
        factor = getattr(recipe, letter)
        if factor.trainable or factor.init not in REGENERABLE_INITS:
            return None
        prefix = key[: -len(marker)]
        a, b = tensors.get(f"{prefix}.lora_A.weight"), tensors.get(f"{prefix}.lora_B.weight")
        if a is None or b is None:
            return None
        entry = {"init": factor.init, "letter": letter, "r": int(a.shape[0]), "weight_shape": [int(b.shape[0]), int(a.shape[1])],
                 "seed": module_seed(seed, prefix.removeprefix("base_model.model."), letter),
                 "dtype": str(tensor.dtype).removeprefix("torch."), "sha256": tensor_sha256(tensor)}
        return entry if torch.equal(_regenerate(entry), tensor) else None
    return None


def _regenerate(entry: dict) -> torch.Tensor:
    value = init_factor(entry["letter"], entry["init"], entry["r"], tuple(entry["weight_shape"]), entry["seed"])
    return value.to(getattr(torch, entry["dtype"]))


def expanded_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter, the frozen ones regenerated and hash-checked."""
    with open(os.path.join(directory, FROZEN_RECORD)) as f:
        record = json.load(f)
    tensors = load_file(os.path.join(directory, COMPACT_WEIGHTS))
    for key, entry in record["factors"].items():
        try:
            value = _regenerate(entry)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CompactAdapterError(f"{directory}/{FROZEN_RECORD}: unreadable entry for {key} ({error})") from None
        if tensor_sha256(value) != entry["sha256"]:
            module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            raise CompactAdapterError(
                f"{directory}: the frozen factor {entry['letter']} of {module} ({entry['init']}, seed {entry['seed']}) "
                f"regenerates to other numbers than were saved (sha256 {tensor_sha256(value)[:12]}... here, "
                f"{entry['sha256'][:12]}... saved, by torch {record.get('torch')}; this is torch {torch.__version__}); "
                "refusing a different adapter: write a full one where it was trained with "
                "`asymllm export --adapter THIS --output FULL --format peft`")
        tensors[key] = value
    return tensors


@contextlib.contextmanager
def full_adapter_dir(directory: str):
    """The folder itself when it is a full adapter; else a temporary full copy (its small files
    copied, the weights expanded), removed afterwards."""
    if not is_compact(directory):
        yield directory
        return
    tensors = expanded_tensors(directory)
    with tempfile.TemporaryDirectory(prefix="asymllm-adapter-") as temp:
        for name in os.listdir(directory):
            source = os.path.join(directory, name)
            if name not in (COMPACT_WEIGHTS, FROZEN_RECORD) and os.path.isfile(source):
                shutil.copy2(source, os.path.join(temp, name))
        save_file(tensors, os.path.join(temp, FULL_WEIGHTS), metadata={"format": "pt"})
        yield temp
