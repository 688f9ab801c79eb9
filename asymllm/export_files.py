"""The merged folder besides its weights (config, generation config, tokenizer with its
chat template) and the adapter-only export's peft folder."""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
from safetensors.torch import save_file

from .checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, verify_adapter_dir
from .export_types import DTYPE_NAMES, ExportError, write_text
from .recipe import Recipe
from .recipe_file import RECIPE_FILE, write_recipe_file
from .safetensors_io import BaseCheckpoint

logger = logging.getLogger("asymllm.export")


def write_config_files(out_dir: str, base: BaseCheckpoint, dtype: torch.dtype) -> list[str]:
    config = dict(base.config)
    # transformers 5 reads "dtype"; older loaders and serving stacks read "torch_dtype".
    config["dtype"] = config["torch_dtype"] = DTYPE_NAMES[dtype]
    write_text(out_dir, "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    files = ["config.json"]
    names = ["generation_config.json"]
    if config.get("auto_map"):  # remote code the config points at travels with it
        names += [n for n in os.listdir(base.directory) if n.endswith(".py")]
    for name in names:
        if os.path.isfile(os.path.join(base.directory, name)):
            shutil.copyfile(os.path.join(base.directory, name), os.path.join(out_dir, name))
            files.append(name)
    return files


def copy_tokenizer(source_dir: str | None, out_dir: str, required: bool) -> list[str]:
    """The tokenizer, with its chat template, loaded and saved by transformers (so any layout
    of tokenizer files comes out in the current one)."""
    if source_dir is None:
        return []
    from transformers import AutoTokenizer

    before = set(os.listdir(out_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir)
    except (OSError, ValueError) as error:
        if required:
            raise ExportError(f"cannot load the tokenizer of {source_dir} ({error})") from None
        logger.warning("no tokenizer written: %s has none that loads (%s)", source_dir, str(error).splitlines()[0])
        return []
    tokenizer.save_pretrained(out_dir)
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("the tokenizer of %s has no chat template; the export has none either", source_dir)
    return sorted(set(os.listdir(out_dir)) - before)


def write_adapter_folder(out_dir: str, tensors: dict[str, torch.Tensor], config: dict, recipe: Recipe | None,
                         seed: int | None, dtype: torch.dtype | None = None, base_name: str | None = None) -> list[str]:
    """A standard peft adapter folder: every factor (frozen ones included), adapter_config.json,
    and lorasym.json when the recipe is known (plain peft ignores it)."""
    os.makedirs(out_dir, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(state, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {**config, "inference_mode": True}
    if base_name:
        config["base_model_name_or_path"] = base_name
    write_text(out_dir, ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True, default=list) + "\n")
    files = [ADAPTER_WEIGHTS, ADAPTER_CONFIG]
    if recipe is not None and seed is not None:
        write_recipe_file(out_dir, recipe, seed)
        files.append(RECIPE_FILE)
    verify_adapter_dir(out_dir)
    return files
