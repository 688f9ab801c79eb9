"""Where an export's adapter and base come from: an adapter folder, a run folder or a
checkpoint-N/ (rebuilt from DeepSpeed shards when its adapter file is unusable), and the
base model it was trained on."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from ..adapters.compact import COMPACT_WEIGHTS, expanded_tensors, is_compact
from ..adapters.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFileError, verify_adapter_dir
from ..adapters.recipe import Recipe
from ..adapters.recipe_file import read_recipe_file
from ..builtin import resolve_model
from ..run_record import RUN_RECORD
from .common import ExportError
from .safetensors_io import BaseCheckpoint
from .zero_checkpoint import has_deepspeed_shards, rebuild_adapter

logger = logging.getLogger("asymllm.export")


@dataclass
class AdapterSource:
    directory: str
    config: dict
    tensors: dict[str, torch.Tensor]       # peft file keys -> tensors
    recipe: Recipe | None
    seed: int | None
    description: str                       # where the tensors came from, for logs and the card
    run_dir: str | None                    # the training run's folder (asymllm_run.json), if known
    rebuilt_from_shards: bool = False


def find_adapter_dir(path: str) -> str:
    """--adapter as given, or its adapter/ subfolder when it is a run folder."""
    if not os.path.isdir(path):
        raise ExportError(f"--adapter {path}: no such folder")
    inner = os.path.join(path, "adapter")
    looks_like_run = not os.path.exists(os.path.join(path, ADAPTER_CONFIG)) and not has_deepspeed_shards(path)
    if looks_like_run and os.path.isfile(os.path.join(inner, ADAPTER_CONFIG)):
        logger.info("--adapter %s is a run folder: using its final adapter %s", path, inner)
        return inner
    return path


def read_adapter(adapter_dir: str, base: BaseCheckpoint | None, base_name: str | None) -> AdapterSource:
    """The adapter file when it is complete; else, in a checkpoint-N/ with DeepSpeed shards, a rebuild."""
    run_dir = os.path.dirname(os.path.abspath(adapter_dir))
    run_dir = run_dir if os.path.isfile(os.path.join(run_dir, RUN_RECORD)) else None
    try:
        verify_adapter_dir(adapter_dir)
    except AdapterFileError as error:
        if not has_deepspeed_shards(adapter_dir):
            raise
        if base is None:
            raise ExportError(f"--adapter {adapter_dir}: rebuilding from the DeepSpeed shards needs the base model (--base)") from None
        logger.info("%s; rebuilding the adapter from the DeepSpeed shards", error)
        rebuilt = rebuild_adapter(adapter_dir, base.shape, base_name or base.name)
        where = (f"DeepSpeed shards {os.path.basename(rebuilt.step_dir)} of {os.path.abspath(adapter_dir)} (the adapter file was "
                 f"unusable: {error}); {len(rebuilt.rebuilt)} frozen factors rebuilt from recipe "
                 f"{rebuilt.recipe.name if rebuilt.recipe else None}, seed {rebuilt.seed}")
        return AdapterSource(adapter_dir, rebuilt.config, rebuilt.tensors, rebuilt.recipe, rebuilt.seed, where,
                             run_dir, rebuilt_from_shards=True)
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    record = read_recipe_file(adapter_dir)
    recipe, seed = record if record else (None, None)
    if is_compact(adapter_dir):  # frozen factors regenerated from their seeds, hash-checked
        return AdapterSource(adapter_dir, config, expanded_tensors(adapter_dir), recipe, seed,
                             f"compact adapter {os.path.abspath(os.path.join(adapter_dir, COMPACT_WEIGHTS))} (frozen factors "
                             "regenerated from their seeds, sha256-checked)", run_dir)
    return AdapterSource(adapter_dir, config, load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS)), recipe, seed,
                         f"adapter file {os.path.abspath(os.path.join(adapter_dir, ADAPTER_WEIGHTS))}", run_dir)


def resolve_base(base: str | None, adapter_dir: str, required: bool = True) -> str | None:
    """A local folder for --base, else for the adapter's recorded base (the run record's as a last resort)."""
    name, flag = base, "--base"
    if name is None:
        name, flag = _recorded_base(adapter_dir), "the adapter's recorded base model"
    if name is None:
        if required:
            raise ExportError(f"--adapter {adapter_dir}: no base model recorded; pass --base PATH")
        return None
    path = os.path.expanduser(resolve_model(name))
    if os.path.isdir(path):
        return path
    looks_local = name.startswith(("/", "./", "../", "~"))
    if not looks_local:
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"])
        except Exception as error:  # offline, unknown name, gated: all mean "not available here"
            reason = f"not a local folder and not downloadable ({type(error).__name__})"
    else:
        reason = "no such folder"
    if required:
        raise ExportError(f"{flag} {name}: {reason}; pass --base PATH to the base model's folder")
    logger.warning("base model %s: %s; adapter-only export continues without shape checks", name, reason)
    return None


def _recorded_base(adapter_dir: str) -> str | None:
    config = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if os.path.isfile(config):
        with open(config) as f:
            name = json.load(f).get("base_model_name_or_path")
        if name:
            return name
    run = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), RUN_RECORD)
    if os.path.isfile(run):
        with open(run) as f:
            return json.load(f).get("model_path")
    return None
