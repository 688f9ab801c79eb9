"""A complete LoRASYM adapter from a DeepSpeed ZeRO checkpoint folder, on one CPU process.

`asymllm train --deepspeed ...` leaves in every OUT/checkpoint-N/:

    adapter_model.safetensors, adapter_config.json, lorasym.json    complete (asymllm.save_adapter)
    global_stepN/ + latest    DeepSpeed's shards: per rank, fp32 partitions of the *trainable*
                              parameters and their optimizer state

`asymllm export` uses the adapter file when it is complete. When it is missing or incomplete
(e.g. a run saved by plain transformers, whose ZeRO-3 save drops frozen parameters: docs/design.md,
trap 12), the adapter is rebuilt here from the shards alone:

- trained factors: merged from the rank partitions by `deepspeed.utils.zero_to_fp32`, on CPU,
  with no process group and no GPU;
- frozen factors: the Trainer's DeepSpeed checkpoint leaves them out too, so they are rebuilt
  from the recipe and seed (lorasym.json, else the run's asymllm_run.json) with the same
  `init_factor(letter, init, r, shape, module_seed(seed, module, letter))` call that
  `asymllm.adapters.model` made at the start of training. `rand`, `he` and `zero` come from a seeded
  CPU generator and are bit-identical anywhere. A frozen `V`/`U` factor (an SVD of W0) is
  refused: singular vectors are defined only up to sign and differ between devices, so a
  rebuilt one may not be the factor B was trained against.
- dtype: every factor is given in the dtype the training forward pass used, which DeepSpeed
  sets for all parameters at every stage (bf16/fp16 when on, else fp32; `_forward_dtype`):
  the trained ones are their fp32 master copies rounded as DeepSpeed rounds them after each
  step, the frozen ones rounded as DeepSpeed rounded them when it wrapped the model.

    from asymllm.export.zero_checkpoint import has_deepspeed_shards, rebuild_adapter
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..adapters.files import peft_file_key
from ..adapters.init import init_factor, module_seed
from ..adapters.recipe import Recipe
from ..adapters.recipe_file import read_recipe_file
from ..run_record import RUN_RECORD
from .common import PREFIX

logger = logging.getLogger(__name__)



class ZeroCheckpointError(RuntimeError):
    """A DeepSpeed checkpoint from which no complete adapter can be rebuilt; the message says why."""


@dataclass
class RebuiltAdapter:
    tensors: dict[str, torch.Tensor]   # peft file keys ('...q_proj.lora_A.weight') -> tensor
    config: dict                       # adapter_config.json contents
    recipe: Recipe | None
    seed: int | None
    step_dir: str                      # the global_stepN folder read
    dtype: torch.dtype                 # the dtype the factors had in the training forward pass
    rebuilt: list[str] = field(default_factory=list)  # keys rebuilt from the recipe, not read


def deepspeed_step_dir(checkpoint_dir: str) -> str | None:
    """The global_stepN folder that `latest` names, else the only global_step* folder, else None."""
    latest = os.path.join(checkpoint_dir, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if os.path.isdir(os.path.join(checkpoint_dir, tag)):
            return os.path.join(checkpoint_dir, tag)
    steps = sorted(glob.glob(os.path.join(checkpoint_dir, "global_step*")))
    steps = [s for s in steps if os.path.isdir(s)]
    return steps[-1] if len(steps) == 1 else None


def has_deepspeed_shards(checkpoint_dir: str) -> bool:
    step = deepspeed_step_dir(checkpoint_dir)
    return step is not None and bool(glob.glob(os.path.join(step, "*model_states.pt")))


def rebuild_adapter(checkpoint_dir: str, base_shape: Callable[[str], tuple[int, ...]],
                    base_name: str | None = None) -> RebuiltAdapter:
    """Trained factors from the shards + frozen factors from the recipe; every module complete.

    `base_shape(key)` gives the shape of a base weight ('model.layers.0.self_attn.q_proj.weight').
    """
    step_dir = deepspeed_step_dir(checkpoint_dir)
    if step_dir is None:
        raise ZeroCheckpointError(f"{checkpoint_dir}: no DeepSpeed global_step*/ folder (or several, and no 'latest' file)")
    ds_config = _ds_config(step_dir)
    dtype = _forward_dtype(ds_config)
    trained = {peft_file_key(name): t.to(dtype) for name, t in _trainable_state(checkpoint_dir, step_dir).items()
               if "lora_" in name or "modules_to_save" in name}
    if not any(".lora_" in k for k in trained):
        raise ZeroCheckpointError(f"{step_dir}: the DeepSpeed shards hold no LoRA parameters; not an adapter training run")
    run = _run_record(checkpoint_dir)
    recipe, seed = _recipe_and_seed(checkpoint_dir, run)
    config = _adapter_config(checkpoint_dir, run, trained, base_name)
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    tensors, rebuilt = dict(trained), []
    for module in sorted({k.split(".lora_")[0] for k in trained if ".lora_" in k}):
        missing = [letter for letter in "AB" if f"{module}.lora_{letter}.weight" not in trained]
        if not missing:
            continue
        if recipe is None:
            raise ZeroCheckpointError(
                f"{checkpoint_dir}: {module}.lora_{missing[0]} is not in the DeepSpeed shards (frozen parameters are "
                f"left out of them) and the recipe and seed that rebuild it are unknown: no lorasym.json here and no "
                f"{RUN_RECORD} in {os.path.dirname(os.path.abspath(checkpoint_dir))}")
        name = module.removeprefix(PREFIX)
        shape = tuple(base_shape(name + ".weight"))
        d_out, d_in = (shape[1], shape[0]) if fan_in_fan_out else shape
        present = trained[f"{module}.lora_{'B' if missing == ['A'] else 'A'}.weight"] if len(missing) == 1 else None
        for letter in missing:
            factor = getattr(recipe, letter)
            if factor.trainable:
                raise ZeroCheckpointError(f"{step_dir}: trained factor {module}.lora_{letter} is missing from the shards")
            if factor.init in ("V", "U"):
                raise ZeroCheckpointError(
                    f"{checkpoint_dir}: the frozen {letter} of recipe {recipe.name} is an SVD of W0 ({factor.init}); the "
                    "DeepSpeed shards do not hold it, and a rebuilt one may differ in sign from the one B was trained "
                    "against; use an adapter file written during training (asymllm.save_adapter writes it into every "
                    "checkpoint-N/)")
            r = present.shape[1] if letter == "A" else present.shape[0]  # B is d_out x r, A is r x d_in
            value = init_factor(letter, factor.init, r, (d_out, d_in), module_seed(seed, name, letter), where=name)
            key = f"{module}.lora_{letter}.weight"
            tensors[key] = value.to(dtype)
            rebuilt.append(key)
    logger.info("rebuilt the adapter from %s: %d tensors read from the shards, %d frozen factors rebuilt from recipe %s, seed %s",
                step_dir, len(trained), len(rebuilt), recipe.name if recipe else None, seed)
    return RebuiltAdapter(tensors, config, recipe, seed, step_dir, dtype, rebuilt)


def _trainable_state(checkpoint_dir: str, step_dir: str) -> dict[str, torch.Tensor]:
    # Imported here: deepspeed is heavy and only this path needs it. Frozen parameters excluded:
    # with them a checkpoint that did save the base would load it whole, in fp32.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=os.path.basename(step_dir),
                                                        exclude_frozen_parameters=True)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise ZeroCheckpointError(f"{step_dir}: cannot read the DeepSpeed shards ({type(error).__name__}: {error})") from None


def _ds_config(step_dir: str) -> dict:
    files = sorted(glob.glob(os.path.join(step_dir, "*model_states.pt")))
    if not files:
        raise ZeroCheckpointError(f"{step_dir}: no *model_states.pt; not a DeepSpeed checkpoint")
    # A DeepSpeed checkpoint is a pickle, as zero_to_fp32 itself reads it: trust it as much as the folder.
    states = torch.load(files[0], map_location="cpu", weights_only=False)
    return states.get("ds_config") or {}


def _forward_dtype(ds_config: dict) -> torch.dtype:
    """The factors' dtype in the training forward pass, at every ZeRO stage: DeepSpeed casts every
    parameter of the module, frozen ones included, to fp16 or bf16 when that mode is on
    (engine._configure_distributed_model; under ZeRO-3 zero.Init builds them in it), and keeps
    only its own fp32 master copy of the trained ones. So B was trained against bf16(A), and a
    rebuilt A must be rounded the same way. ("bfloat16" is DeepSpeed's older name of "bf16".)"""
    if _enabled(ds_config.get("fp16")):
        return torch.float16
    if _enabled(ds_config.get("bf16")) or _enabled(ds_config.get("bfloat16")):
        return torch.bfloat16
    return torch.float32


def _enabled(section) -> bool:
    # transformers resolves "auto" before DeepSpeed sees (and saves) the config
    return isinstance(section, dict) and section.get("enabled") is True


def _run_record(checkpoint_dir: str) -> dict | None:
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_dir)), RUN_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _recipe_and_seed(checkpoint_dir: str, run: dict | None) -> tuple[Recipe | None, int | None]:
    record = read_recipe_file(checkpoint_dir)
    if record is not None:
        return record
    if run and run.get("recipe") is not None and run.get("seed") is not None:
        return Recipe.parse(run["recipe"]), int(run["seed"])
    return None, None


def _adapter_config(checkpoint_dir: str, run: dict | None, tensors: dict, base_name: str | None) -> dict:
    """adapter_config.json of the checkpoint, else one built from the run record and the tensors."""
    path = os.path.join(checkpoint_dir, "adapter_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    if not run or "adapter" not in run:
        raise ZeroCheckpointError(
            f"{checkpoint_dir}: no adapter_config.json and no {RUN_RECORD} beside it; the LoRA rank and alpha are unknown")
    adapter = run["adapter"]
    modules = {k.split(".lora_")[0] for k in tensors if ".lora_" in k}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter["lora_r"], "lora_alpha": adapter["lora_alpha"],
        "lora_dropout": adapter.get("lora_dropout", 0.0), "use_rslora": adapter.get("use_rslora", False),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "base_model_name_or_path": base_name or run.get("model_path"),
    }
