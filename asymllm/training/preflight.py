"""Fail before the hour, not after it: checks that run before the model loads.

A cluster job that learns at its first save (an hour in) that its output folder is read-only
or full has lost that hour on every GPU; one whose ranks were given different flags (a
node started from another config) trains something nobody asked for, or hangs in a
collective. Both are found here, before any weight is read:
- the output folder is created if needed, a file is written and removed there, and the
  free space is compared with one checkpoint's size, estimated from the adapter's shape
  (read from the model's config on the meta device: no weights are loaded);
- on more than one rank, the output folder must be one folder for all of them: each rank writes
  a marker file there and every rank must see every marker. Checkpoints, completion markers and
  the resume all rely on it; two nodes each writing to a local disk at the same path would each
  keep half a run, and a resume would find nothing complete (or another node's stale files);
- every rank's recipe, seed, rank, alpha, targets and resume checkpoint are gathered and
  compared with rank 0's; a difference is an error on every rank, naming the rank and flag.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
import uuid

import torch

from ..adapters.recipe import Recipe
from ..adapters.targets import resolve_targets
from ..distributed import barrier, gather_objects_from_ranks
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
    except ConfigError as error:
        problem = str(error)
    problem = check_output_shared(output_dir, problem)  # a collective: every rank enters it
    try:
        if problem:
            raise ConfigError(problem)
        adapter_params, trainable = _adapter_counts(model_path, adapter_args, recipe)
        needed = checkpoint_bytes(adapter_params, trainable)
        check_free_space(output_dir, needed, f"{adapter_params:,} adapter parameters, {trainable:,} trained")
    except ConfigError as error:
        problem = str(error)
    check_ranks_agree(settings, problem)
    world = rank_and_world()[1]
    logger.info("preflight: %s writable%s, %.0f MiB free, a checkpoint needs about %.0f MiB%s", output_dir,
                f" and one folder for all {world} ranks" if world > 1 else "", shutil.disk_usage(output_dir).free / MiB,
                needed / MiB, f"; {world} ranks agree on the settings" if world > 1 else "")


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


SHARED_WAIT_S = float(os.environ.get("ASYMLLM_SHARED_CHECK_SECONDS", "20"))  # NFS may show another node's file late


def check_output_shared(output_dir: str, problem: str | None) -> str | None:
    """On more than one rank: every rank writes a marker in output_dir, then looks for everyone's
    (for up to SHARED_WAIT_S: a network filesystem may cache a directory listing); returns this
    rank's problem, if any. Every rank enters its barriers, the troubled ones too."""
    rank, world = rank_and_world()
    if world == 1:
        return problem
    token = gather_objects_from_ranks(uuid.uuid4().hex[:12])[0]  # rank 0's: one name for this check on every rank
    marker = os.path.join(output_dir, f".asymllm-shared-{token}-rank{{}}")
    if problem is None:
        with open(marker.format(rank), "w") as f:
            f.write(socket.gethostname())
    barrier()
    deadline = time.monotonic() + SHARED_WAIT_S
    missing = _missing_markers(marker, world)
    while missing and problem is None and time.monotonic() < deadline:
        time.sleep(0.5)
        missing = _missing_markers(marker, world)
    barrier()  # nobody removes a marker while another rank still looks for it
    if os.path.exists(marker.format(rank)):
        os.remove(marker.format(rank))
    if problem is None and missing:
        problem = (f"--output_dir {output_dir}: not one folder for all {world} ranks: rank {rank} (host "
                   f"{socket.gethostname()}) cannot see the files rank{'s' if len(missing) > 1 else ''} "
                   f"{', '.join(map(str, missing))} wrote there in {SHARED_WAIT_S:g} s. Checkpoints, their completion "
                   "markers and resumes need one folder every node sees: put --output_dir on a filesystem every node "
                   "mounts at the same path (NFS, Lustre, ...) and give it as an absolute path")
    return problem


def _missing_markers(marker: str, world: int) -> list[int]:
    folder = os.path.dirname(marker) or "."
    try:
        present = set(os.listdir(folder))  # a listing revalidates the directory on NFS where a lookup may not
    except OSError:
        present = set()
    return [r for r in range(world) if os.path.basename(marker.format(r)) not in present]


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
    gathered = gather_objects_from_ranks((settings, problem))
    every = [theirs for theirs, _ in gathered]
    for rank, theirs in enumerate(every[1:], start=1):  # first: a rank's problem may come from its other flags
        differ = [f"{flag} {theirs.get(flag)!r} on rank {rank}, {value!r} on rank 0"
                  for flag, value in every[0].items() if theirs.get(flag) != value]
        if differ:
            raise ConfigError(f"the ranks were started with different settings ({'; '.join(differ)}); every rank "
                              "(every node's launch command) must get the same flags and config file")
    troubled = [(rank, theirs) for rank, (_, theirs) in enumerate(gathered) if theirs]
    if troubled:
        rank, message = troubled[0]
        raise ConfigError(message if len(gathered) == 1 else f"rank {rank}: {message}")


def check_push_to_hub(push_to_hub: bool, hub_model_id: str | None, hub_token: str | None = None) -> None:
    """--push_to_hub needs the hub and a token; without either, transformers fails deep inside the
    Trainer after the model has loaded. Asked here, before anything loads."""
    if not push_to_hub:
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ConfigError("--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be pushed; leave --push_to_hub out and "
                          "upload the adapter folder later (hf upload REPO OUT/adapter)")
    from huggingface_hub import HfApi

    try:
        user = HfApi(token=hub_token).whoami()
    except Exception as error:  # no network, no token, a bad token: each its own exception type
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--push_to_hub{f' --hub_model_id {hub_model_id}' if hub_model_id else ''}: the hub does not "
                          f"answer with a user for this token ({first}); log in (hf auth login, or HF_TOKEN), or leave "
                          "--push_to_hub out and upload the adapter folder later (hf upload REPO OUT/adapter)") from None
    logger.info("push_to_hub: as %s", user.get("name"))
