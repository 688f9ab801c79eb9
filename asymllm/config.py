"""Run configuration: asymllm's own options plus every SFTConfig field, from YAML and flags.

TRL's parser convention: `--config run.yaml` sets defaults, flags win. asymllm's
defaults differ from TRL's only where TRL's would be wrong for the machine (bf16 and
gradient checkpointing on a CPU) or for adapters (a LoRA-sized learning rate).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch

from .adapter import DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT, DEFAULT_LORA_R  # one set of defaults: the Python API's


class ConfigError(ValueError):
    """A flag or config file that cannot be used; the message names it."""


@dataclass
class AdapterArguments:
    recipe: str = field(default="A_rand_hB_zero", metadata={"help": "LoRASYM recipe or alias (asymllm recipes)"})
    lora_r: int = field(default=DEFAULT_LORA_R, metadata={"help": "adapter rank r"})
    lora_alpha: float = field(default=DEFAULT_LORA_ALPHA, metadata={"help": "scale s = lora_alpha / r (or / sqrt(r) with --use_rslora)"})
    lora_dropout: float = field(default=DEFAULT_LORA_DROPOUT, metadata={"help": "dropout on the adapter input"})
    target_modules: list[str] | None = field(default=None, metadata={"help": "projections to adapt (default: q,k,v,o,gate,up,down)"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling lora_alpha / sqrt(r)"})


@dataclass
class ModelArguments:
    model: str | None = field(default=None, metadata={"help": "local folder or hub name (default: built-in SmolLM2-135M-Instruct)"})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "flash_attention_2, sdpa or eager (default: flash_attention_2 when flash-attn and CUDA are present, else sdpa)"}
    )


@dataclass
class DataArguments:
    dataset: str | None = field(default=None, metadata={"help": "json/jsonl/parquet/csv file or hub name (default: built-in instructions)"})
    dataset_split: str = field(default="train", metadata={"help": "split to train on: of a hub dataset, or the key of a local JSON object keyed by split"})
    eval_dataset: str | None = field(default=None, metadata={"help": "held-out file or hub name (default with the built-in data: its held-out part)"})
    eval_split: str = field(default="test", metadata={"help": "split of --eval_dataset to hold out (hub split, or key of a local JSON object keyed by split)"})
    eval_fraction: float = field(default=0.0, metadata={"help": "hold out this fraction of --dataset when no --eval_dataset is given"})
    stop_after_steps: int | None = field(default=None, metadata={"help": "stop (after saving a checkpoint) at this step, as if interrupted; for resume drills"})
    # transformers 5 dropped TrainingArguments.overwrite_output_dir; asymllm keeps the flag users know.
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start a fresh run in an --output_dir that holds an earlier run's adapter/ or checkpoint-*, deleting those"})


def machine_defaults() -> dict:
    """SFTConfig defaults that depend on the machine or suit adapters."""
    cuda = torch.cuda.is_available()
    return {
        "output_dir": "outputs/{recipe}-r{lora_r}-s{seed}",  # filled in by train(); one folder per seed
        "bf16": cuda and torch.cuda.is_bf16_supported(),
        "gradient_checkpointing": cuda,  # memory on GPUs; on CPU it only costs time
        "learning_rate": 1e-3,
        "num_train_epochs": 2.0,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "max_length": 512,
        "logging_steps": 5,
        "save_strategy": "epoch",
        "save_total_limit": 2,
        "eval_strategy": "no",
        "lr_scheduler_type": "cosine",
        "warmup_steps": 5,
        "report_to": "none",
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": cuda,
    }


def parse_train_args(argv: list[str] | None = None, use_configured_state: bool = False):
    """(AdapterArguments, ModelArguments, DataArguments, SFTConfig) from YAML + flags.

    `use_configured_state`: the distributed state was built by the gloo bootstrap, and the
    Trainer must use it rather than build one without a backend.
    """
    from trl import SFTConfig, TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser((AdapterArguments, ModelArguments, DataArguments, SFTConfig), prog="asymllm train")
    defaults = machine_defaults()
    if use_configured_state:
        defaults["accelerator_config"] = {"use_configured_state": True}
    parser.set_defaults(**defaults)
    if "--config" in argv:
        read_yaml_config(argv)  # clear errors for a missing or malformed file, before TRL opens it
    try:
        return parser.parse_args_and_config(args=argv)
    except ValueError as error:  # unknown flags, or unknown keys in the YAML file
        raise ConfigError(f"{error}{_suggest_flags(parser, argv)}") from None


def _suggest_flags(parser, argv: list[str]) -> str:
    import difflib

    known = [option for action in parser._actions for option in action.option_strings]
    unknown = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in known and a != "--config"]
    hints = [f"{flag} -> {close[0]}" for flag in unknown if (close := difflib.get_close_matches(flag, known, n=1))]
    return f" (did you mean: {', '.join(hints)}?)" if hints else ""


def uses_deepspeed(argv: list[str]) -> bool:
    """Whether a DeepSpeed config is asked for, before anything is parsed (the bootstrap must
    run before SFTConfig is built)."""
    if any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv):
        return True
    if "--config" in argv:
        config = read_yaml_config(argv)
        return bool(config.get("deepspeed"))
    return False


def read_yaml_config(argv: list[str]) -> dict:
    import yaml

    index = argv.index("--config")
    if index + 1 >= len(argv):
        raise ConfigError("--config needs a YAML file path")
    path = argv[index + 1]
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--config {path}: must be a YAML mapping of flag names to values")
    return config
