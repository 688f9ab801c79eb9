"""The merged folder besides its weights (config, generation config, tokenizer with its
chat template, chosen and checked before anything is written) and the adapter-only export's
peft folder."""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
from safetensors.torch import save_file

from ..adapters.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, verify_adapter_dir
from ..adapters.recipe import Recipe
from ..adapters.recipe_file import RECIPE_FILE, write_recipe_file
from .common import DTYPE_NAMES, ExportError, write_text
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


# What a folder needs for AutoTokenizer to load a real tokenizer. Looked for before loading:
# for some model types (GPT-2, Qwen2, Gemma) transformers 5 builds an *empty* tokenizer from a
# folder that has none of them instead of raising, and that would be saved as the export's.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model")
NO_TOKENIZER = "none"   # --tokenizer none: export without one, on purpose


def has_tokenizer_files(directory: str | None) -> bool:
    if not directory or not os.path.isdir(directory):
        return False
    return any(name in TOKENIZER_FILES or name.startswith("vocab.") or name.endswith((".model", ".tiktoken"))
               for name in os.listdir(directory))


def choose_tokenizer(flag: str | None, own_dirs: list[tuple[str, str | None]], vocab_size: int | None,
                     required: bool):
    """The tokenizer to ship, loaded (so that a bad one is refused before anything is written):
    --tokenizer's, else the first of `own_dirs` ((what, folder): the adapter's, the base's) that
    has tokenizer files. None with --tokenizer none (a warning), or when none is found and the
    export can do without (`required` False: an adapter-only export)."""
    if flag is not None and flag.lower() == NO_TOKENIZER:
        logger.warning("exporting without a tokenizer (--tokenizer none): load one from elsewhere next to this model")
        return None
    if flag is not None:
        if not has_tokenizer_files(flag):
            raise ExportError(f"--tokenizer {flag}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) there; pass a "
                              f"folder that has them, or --tokenizer {NO_TOKENIZER} to export without one")
        return _load_tokenizer(f"--tokenizer {flag}", flag, vocab_size)
    for what, directory in own_dirs:
        if has_tokenizer_files(directory):
            return _load_tokenizer(f"{what} {directory}", directory, None)
    if required:
        folders = " nor in ".join(f"the {what} {d}" for what, d in own_dirs if d)
        raise ExportError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {folders}; pass --tokenizer PATH "
                          f"(a folder with the model's tokenizer, e.g. the original model's) or --tokenizer "
                          f"{NO_TOKENIZER} to export without one")
    return None


def _load_tokenizer(where: str, directory: str, vocab_size: int | None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise ExportError(f"{where}: its tokenizer does not load ({str(error).splitlines()[0]})") from None
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        raise ExportError(f"{where}: the tokenizer loaded empty ({len(tokenizer)} tokens); pass --tokenizer PATH")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ExportError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{vocab_size}; it belongs to another model")
    return tokenizer


def save_tokenizer(tokenizer, out_dir: str) -> list[str]:
    """Saved by transformers, with its chat template (so any layout of tokenizer files comes
    out in the current one), then reloaded from `out_dir` as a user would; the names of the
    files written."""
    if tokenizer is None:
        return []
    before = set(os.listdir(out_dir))
    tokenizer.save_pretrained(out_dir)
    _check_reloads_the_same(tokenizer, out_dir)
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("the tokenizer %s has no chat template; the export has none either", tokenizer.name_or_path)
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


TOKENIZER_PROBE = "What is 12 + 30? Write a haiku about autumn leaves, in 2024."


def _check_reloads_the_same(tokenizer, out_dir: str) -> None:
    # transformers may load saved files as another class than the one saved (it can follow the
    # model's config: a generic tokenizer next to a Qwen2 config comes back as Qwen2Tokenizer,
    # which splits digits): the export must tokenize as its source did.
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(out_dir)
    want, got = tokenizer(TOKENIZER_PROBE)["input_ids"], reloaded(TOKENIZER_PROBE)["input_ids"]
    if got != want or getattr(reloaded, "chat_template", None) != getattr(tokenizer, "chat_template", None):
        raise ExportError(f"the tokenizer of {tokenizer.name_or_path} reloads from the export as "
                          f"{type(reloaded).__name__} and tokenizes or templates differently ({TOKENIZER_PROBE!r}: "
                          f"{len(got)} ids instead of {len(want)}); pass --tokenizer a folder with this model's own tokenizer")
