"""Fail before the hour, not after it: checks that run before the model loads.

A cluster job that learns at its first save (an hour in) that its output folder is read-only
or full has lost that hour on every GPU; one whose ranks were given different flags (a
node started from another config) trains something nobody asked for, or hangs in a
collective. Both are found here, before any weight is read:
- the output folder is created if needed, a file is written and removed there, and the
  free space is compared with one checkpoint's size, estimated from the adapter's shape
  (read from the model's config on the meta device: no weights are loaded);
- every rank's recipe, seed, rank, alpha, targets and resume checkpoint are gathered and
  compared with rank 0's; a difference is an error on every rank, naming the rank and flag.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import torch

from ..adapters.recipe import Recipe
from ..adapters.targets import resolve_targets
from ..distributed import gather_objects_from_ranks
from ..zero import rank_and_world
from .config import ConfigError

logger = logging.getLogger("asymllm.train")

MiB = 1 << 20
# bytes a checkpoint holds per adapter parameter: the adapter file (fp32, every factor); and per
# trainable one: Adam's two moments, plus DeepSpeed's fp32 master copy (one figure for both).
ADAPTER_FILE_BYTES, OPTIMIZER_BYTES_PER_TRAINABLE = 4, 12
CHECKPOINT_OVERHEAD = 16 * MiB  # tokenizer, RNG states, trainer state, DeepSpeed's model-state files


def preflight(output_dir: str, model_path: str, adapter_args, recipe: Recipe, settings: dict) -> None:
    """All of it, on every rank. Each rank's own problem is shared with all, so that all stop
    together: a rank stopping alone would leave the others waiting in a collective."""
    problem = None
    try:
        check_output_writable(output_dir)
        adapter_params, trainable = _adapter_counts(model_path, adapter_args, recipe)
        needed = checkpoint_bytes(adapter_params, trainable)
        check_free_space(output_dir, needed, f"{adapter_params:,} adapter parameters, {trainable:,} trained")
    except ConfigError as error:
        problem = str(error)
    check_ranks_agree(settings, problem)
    world = rank_and_world()[1]
    logger.info("preflight: %s writable, %.0f MiB free, a checkpoint needs about %.0f MiB%s", output_dir,
                shutil.disk_usage(output_dir).free / MiB, needed / MiB, f"; {world} ranks agree on the settings" if world > 1 else "")


def _adapter_counts(model_path: str, adapter_args, recipe: Recipe) -> tuple[int, int]:
    try:
        return adapter_shape_counts(model_path, adapter_args.target_modules, adapter_args.lora_r, recipe)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--model {model_path}: cannot read its config ({first})") from None


def check_output_writable(output_dir: str) -> None:
    """The folder exists (made if not) and a file can be written in it."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".asymllm-write-check-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"--output_dir {output_dir}: cannot write there ({error.strerror or error}); "
                          "checkpoints and the adapter go there: choose a writable folder") from None


def adapter_shape_counts(model_path: str, target_modules, r: int, recipe: Recipe) -> tuple[int, int]:
    """(adapter parameters, trainable ones) for this model, targets and rank, from its config
    alone: the model is built on the meta device, which allocates nothing."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(model_path)
    # the class itself, not from_config: under ZeRO-3 from_config builds inside deepspeed.zero.Init,
    # which would try to partition the meta tensors
    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    targets = resolve_targets(model, target_modules)
    a_total = b_total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _targeted(name, targets):
            a_total, b_total = a_total + r * module.in_features, b_total + r * module.out_features
    trainable = (a_total if recipe.A.trainable else 0) + (b_total if recipe.B.trainable else 0)
    return a_total + b_total, trainable


def _targeted(name: str, targets) -> bool:
    """peft's rule: a list matches a module whose name is, or ends with, an entry; a string is a
    regex over the full name."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def checkpoint_bytes(adapter_params: int, trainable: int) -> int:
    return adapter_params * ADAPTER_FILE_BYTES + trainable * OPTIMIZER_BYTES_PER_TRAINABLE + CHECKPOINT_OVERHEAD


def check_free_space(output_dir: str, needed: int, what: str) -> None:
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise ConfigError(f"--output_dir {output_dir}: {free / MiB:.1f} MiB free, and one checkpoint needs about "
                          f"{needed / MiB:.1f} MiB ({what}); free some space or choose another --output_dir")


def check_ranks_agree(settings: dict, problem: str | None = None) -> None:
    """Every rank's settings (flag -> value) equal rank 0's, and no rank found a problem of its
    own (`problem`: its message); else one error, on every rank, naming the rank."""
    every = gather_objects_from_ranks((settings, problem))
    troubled = [(rank, theirs) for rank, (_, theirs) in enumerate(every) if theirs]
    if troubled:
        rank, message = troubled[0]
        raise ConfigError(message if len(every) == 1 else f"rank {rank}: {message}")
    every = [theirs for theirs, _ in every]
    for rank, theirs in enumerate(every[1:], start=1):
        differ = [f"{flag} {theirs.get(flag)!r} on rank {rank}, {value!r} on rank 0"
                  for flag, value in every[0].items() if theirs.get(flag) != value]
        if differ:
            raise ConfigError(f"the ranks were started with different settings ({'; '.join(differ)}); every rank "
                              "(every node's launch command) must get the same flags and config file")
