"""Run configuration: asymllm's own options plus every SFTConfig field, from YAML and flags.

TRL's parser convention: `--config run.yaml` sets defaults, flags win (a commented example:
launch/run.example.yaml). asymllm's defaults differ from TRL's only where TRL's would be
wrong for the machine (bf16 and activation checkpointing on a CPU) or for adapters (a
LoRA-sized learning rate). Flag values are checked by `check_run_flags` before anything loads.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields

import torch
from trl import SFTConfig

from ..adapters.model import DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT, DEFAULT_LORA_R  # one set of defaults: the Python API's
from ..adapters.recipe import Recipe, RecipeError
from ..adapters.targets import ALL_LINEAR
from .precision import choose_cpu_autocast, cpu_bf16_units
from .trl_fields import FieldError, check_chat_template, check_trl_fields


class ConfigError(ValueError):
    """A flag or config file that cannot be used; the message names it."""


@dataclass
class AdapterArguments:
    recipe: str = field(default="A_rand_hB_zero", metadata={"help": "LoRASYM recipe or alias (asymllm recipes)"})
    lora_r: int = field(default=DEFAULT_LORA_R, metadata={"help": "adapter rank r"})
    lora_alpha: float = field(default=DEFAULT_LORA_ALPHA, metadata={"help": "scale s = lora_alpha / r (or / sqrt(r) with --use_rslora)"})
    lora_dropout: float = field(default=DEFAULT_LORA_DROPOUT, metadata={"help": "dropout on the adapter input"})
    target_modules: list[str] | None = field(default=None, metadata={"help": "projections to adapt, or all-linear (every linear layer of the transformer blocks, never the output head); default: q,k,v,o,gate,up,down"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling lora_alpha / sqrt(r)"})
    fused_frozen_a: bool = field(default=True, metadata={
        "help": "base and frozen A as one autograd node, the adapter added in place: peft's numbers, a faster step; false: peft's forward"})
    save_frozen_as: str = field(default="tensor", metadata={
        "help": "tensor: the final adapter is a plain peft one; seed: frozen rand/he/zero factors stored as their seed and "
                "sha256 (half the file for A_rand_hB_zero; asymllm export --format peft writes the plain one)"})


@dataclass
class ModelArguments:
    model: str | None = field(default=None, metadata={"help": "local folder or hub name (default: built-in SmolLM2-135M-Instruct)"})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "flash_attention_2, sdpa or eager (default: flash_attention_2 when flash-attn and CUDA are present, else sdpa)"}
    )
    # QLoRA, with TRL ModelConfig's names (asymllm.quantization)
    load_in_4bit: bool = field(default=False, metadata={"help": "load the base in 4 bits (bitsandbytes; pip install 'asymllm[qlora]')"})
    load_in_8bit: bool = field(default=False, metadata={"help": "load the base in 8 bits (bitsandbytes LLM.int8)"})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 or fp4, with --load_in_4bit"})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "quantize the 4-bit scales too (double quantization)"})
    bnb_4bit_compute_dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 (default: the training dtype)"})
    bnb_4bit_quant_storage: str | None = field(default=None, metadata={
        "help": "dtype the packed 4-bit weights are stored in (default uint8; ZeRO-3 needs the training dtype)"})

    def quantization(self):
        from ..quantization import Quantization

        return Quantization(self.load_in_4bit, self.load_in_8bit, self.bnb_4bit_quant_type, self.use_bnb_nested_quant,
                            self.bnb_4bit_compute_dtype, self.bnb_4bit_quant_storage)


@dataclass
class DataArguments:
    dataset: str | None = field(default=None, metadata={"help": "json/jsonl/parquet/csv file or hub name (default: built-in instructions)"})
    dataset_split: str = field(default="train", metadata={"help": "split to train on: of a hub dataset, or the key of a local JSON object keyed by split"})
    eval_dataset: str | None = field(default=None, metadata={"help": "held-out file or hub name (default with the built-in data: its held-out part)"})
    eval_split: str = field(default="test", metadata={"help": "split of --eval_dataset to hold out (hub split, or key of a local JSON object keyed by split)"})
    eval_fraction: float = field(default=0.0, metadata={"help": "hold out this fraction of --dataset when no --eval_dataset is given"})
    chat_template: str | None = field(default=None, metadata={
        "help": "chatml, llama3, llama2, mistral, alpaca, tokenizer (the tokenizer's own) or a Jinja file (default: the "
                "tokenizer's own; for a tokenizer without one, chatml or llama3 where its vocabulary has their turn "
                "tokens, else alpaca); saved with the adapter, and used by eval, chat and export"})
    train_on_inputs: bool = field(default=False, metadata={
        "help": "loss on every token, the prompt too (default: on the responses and the token that ends each)"})
    stop_after_steps: int | None = field(default=None, metadata={"help": "stop (after saving a checkpoint) at this step, as if interrupted; for resume drills"})
    # transformers 5 dropped TrainingArguments.overwrite_output_dir; asymllm keeps the flag users know.
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start a fresh run in an --output_dir that holds an earlier run's adapter/ or checkpoint-*, deleting those"})


@dataclass
class RunConfig(SFTConfig):
    """TRL's SFTConfig, with asymllm's machine default for activation checkpointing and plain
    progress lines when stderr is not a terminal."""

    # TRL defaults transformers' deprecated name to True, so transformers warned on every run;
    # unset here, the value is carried by --activation_checkpointing. A user who passes the old
    # name still gets it applied (with transformers' own notice that the name is deprecated).
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "deprecated name of --activation_checkpointing", "nargs": "?", "const": True})
    # transformers' --bf16 is GPU-only (bf16 weights); on a CPU with bf16 units asymllm autocasts instead.
    cpu_autocast_bf16: bool | None = field(default=None, metadata={
        "help": "bf16 autocast on a CPU that reports amx_bf16 or avx512_bf16, fp32 master weights (default false: "
                "measured 0.98x the fp32 wall time on the default run, benchmarks/RESULTS.md)"})
    max_bad_steps: int = field(default=0, metadata={
        "help": "steps with a non-finite loss (on any rank) to skip, optimizer step included, before the run stops "
                "(default 0: stop at the first, nothing saved after the last good checkpoint); a finite loss above the "
                "divergence bound stated in the log is never skipped: 3 such steps in a row stop the run"})

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = torch.cuda.is_available()  # memory on GPUs; on CPU it only costs time
        if self.disable_tqdm is None and not _stderr_is_a_terminal():
            self.disable_tqdm = True  # a redirected progress bar is one line that grows forever; see trainer.PlainProgress
        super().__post_init__()


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def machine_defaults() -> dict:
    """SFTConfig defaults that depend on the machine or suit adapters (activation
    checkpointing: RunConfig, as it depends on whether the user named it either way)."""
    cuda = torch.cuda.is_available()
    return {
        "output_dir": "outputs/{recipe}-r{lora_r}-s{seed}",  # filled in by train(); one folder per seed
        "bf16": cuda and torch.cuda.is_bf16_supported(),
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
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser((AdapterArguments, ModelArguments, DataArguments, RunConfig), prog="asymllm train")
    defaults = machine_defaults()
    if use_configured_state:
        defaults["accelerator_config"] = {"use_configured_state": True}
    parser.set_defaults(**defaults)
    if "--config" in argv:
        read_yaml_config(argv)  # clear errors for a missing or malformed file, before TRL opens it
    try:
        parsed = parser.parse_args_and_config(args=argv)
    except ValueError as error:  # unknown flags, or a value SFTConfig refuses
        if "support bf16" in str(error):  # transformers' refusal names neither the flag nor the way out
            raise ConfigError("--bf16 true: this machine cannot train in bf16 (transformers allows it only on a GPU "
                              "that supports it); pass --bf16 false, or drop bf16 from the --config file (on a CPU with bf16 units, "
                              "--cpu_autocast_bf16 true autocasts instead)"
                              f"{_suggest_flags(parser, argv)}") from None
        raise ConfigError(f"{error}{_suggest_flags(parser, argv)}") from None
    set_cpu_precision(parsed[3])
    return parsed


def set_cpu_precision(sft_config) -> None:
    """Resolve --cpu_autocast_bf16 for this machine; the log line goes to sft_config.precision_note."""
    try:
        on, note = choose_cpu_autocast(sft_config.cpu_autocast_bf16, cpu_bf16_units(), torch.cuda.is_available())
    except ValueError as error:
        raise ConfigError(str(error)) from None
    sft_config.cpu_autocast_bf16, sft_config.precision_note = on, note


def _suggest_flags(parser, argv: list[str]) -> str:
    known = [option for action in parser._actions for option in action.option_strings]
    unknown = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in known and a != "--config"]
    return _did_you_mean(unknown, known)


# Names users bring from older transformers/TRL, with what takes their place
REMOVED = {"warmup_ratio": "transformers 5 removed warmup_ratio: warmup_steps below 1 is a fraction of the run "
                           "(warmup_steps 0.03 = 3%)"}


def _did_you_mean(unknown: list[str], known: list[str]) -> str:
    """' (did you mean: --lora_rr -> --lora_r?)': one wording for flags and YAML keys."""
    removed = [REMOVED[name.lstrip("-")] for name in unknown if name.lstrip("-") in REMOVED]
    if removed:
        return f" ({'; '.join(removed)})"
    hints = [f"{name} -> {close[0]}" for name in unknown if (close := difflib.get_close_matches(name, known, n=1))]
    return f" (did you mean: {', '.join(hints)}?)" if hints else ""


def config_keys() -> list[str]:
    """The keys a --config YAML file may hold: every flag's name, and TRL's `env` mapping."""
    return [f.name for dc in (AdapterArguments, ModelArguments, DataArguments, RunConfig) for f in fields(dc) if f.init] + ["env"]


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
    known = config_keys()
    unknown = [str(key) for key in config if key not in known]
    if unknown:  # said here, before TRL's "add them to the dataclass" message
        raise ConfigError(f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                          f"{_did_you_mean(unknown, known)}; keys are flag names without the leading --")
    return config


# --- flag values, checked before anything is loaded: one line naming the flag and what it accepts


def training_dtype_name(sft_config) -> str:
    return "bfloat16" if sft_config.bf16 else "float16" if sft_config.fp16 else "float32"


def check_quantization(model_args, sft_config):
    """The base's quantization (asymllm.quantization.Quantization), checked before anything loads."""
    from ..quantization import QuantizationError

    quant = model_args.quantization()
    try:
        quant.check()
    except QuantizationError as error:
        raise ConfigError(str(error)) from None
    if quant.load_in_4bit and zero_stage(sft_config.deepspeed) == 3:
        # peft's QLoRA + ZeRO-3 setup: packed 4-bit weights stored in the training dtype, which ZeRO-3 partitions
        wanted = training_dtype_name(sft_config)
        if model_args.bnb_4bit_quant_storage not in (None, wanted):
            raise ConfigError(f"--bnb_4bit_quant_storage {model_args.bnb_4bit_quant_storage} with ZeRO-3: must be the "
                              f"training dtype ({wanted}) so ZeRO-3 can partition the packed weights; leave it out")
        model_args.bnb_4bit_quant_storage = quant.bnb_4bit_quant_storage = wanted
    return quant


def zero_stage(deepspeed) -> int | None:
    """The ZeRO stage of a --deepspeed config (a JSON file or a mapping from a --config YAML)."""
    if not deepspeed:
        return None
    config = deepspeed
    if not isinstance(config, dict):
        try:
            with open(config) as f:
                config = json.load(f)
        except (OSError, ValueError):
            return None
    stage = (config.get("zero_optimization") or {}).get("stage")
    return stage if isinstance(stage, int) else None


def _check_save_frozen_as(value: str, recipe: Recipe) -> None:
    from ..adapters.compact import REGENERABLE_INITS, SAVE_FROZEN_AS

    if value not in SAVE_FROZEN_AS:
        raise ConfigError(f"--save_frozen_as {value}: choose one of {', '.join(SAVE_FROZEN_AS)}")
    regenerable = [letter for letter in "AB" if not getattr(recipe, letter).trainable
                   and getattr(recipe, letter).init in REGENERABLE_INITS]
    if value == "seed" and not regenerable:
        raise ConfigError(f"--save_frozen_as seed: recipe {recipe.name} has no frozen {'/'.join(REGENERABLE_INITS)} factor "
                          "to store as a seed (V and U come from the base's SVD); drop the flag")


def check_run_flags(adapter_args, data_args, sft_config) -> Recipe:
    """Refuse flag values that would fail (or silently do nothing) after the data and the model
    have loaded. Returns the parsed recipe."""
    try:
        recipe = Recipe.parse(adapter_args.recipe)
    except RecipeError as error:
        raise ConfigError(f"--recipe {adapter_args.recipe}: {error}") from None
    _require(adapter_args.lora_r, "--lora_r", "a positive integer (the adapter rank, e.g. 8, 16 or 64)",
             lambda v: _is_int(v) and v >= 1)
    _require(adapter_args.lora_alpha, "--lora_alpha", "a positive number (the scale is lora_alpha / r, e.g. 2 * r)",
             lambda v: _is_number(v) and v > 0)
    _require(adapter_args.lora_dropout, "--lora_dropout", "a probability in [0, 1), e.g. 0 or 0.05",
             lambda v: _is_number(v) and 0 <= v < 1)
    adapter_args.target_modules = _check_target_modules(adapter_args.target_modules)
    _check_save_frozen_as(adapter_args.save_frozen_as, recipe)
    try:
        check_chat_template(data_args, sft_config)
        check_trl_fields(sft_config)
    except FieldError as error:
        raise ConfigError(str(error)) from None
    _require(sft_config.learning_rate, "--learning_rate", "a positive number (e.g. 1e-3 for adapters)",
             lambda v: _is_number(v) and v > 0)
    _require(sft_config.max_length, "--max_length", "a positive integer number of tokens (e.g. 512 or 2048)",
             lambda v: v is None or (_is_int(v) and v >= 1))
    _require(data_args.eval_fraction, "--eval_fraction", "a fraction in [0, 1), e.g. 0.05 (0: hold nothing out)",
             lambda v: _is_number(v) and 0 <= v < 1)
    _require(data_args.stop_after_steps, "--stop_after_steps", "a positive integer step",
             lambda v: v is None or (_is_int(v) and v >= 1))
    _require(getattr(sft_config, "max_bad_steps", 0), "--max_bad_steps", "a whole number of steps >= 0 (0: stop at the first)",
             lambda v: _is_int(v) and v >= 0)
    if getattr(sft_config, "max_bad_steps", 0) and sft_config.deepspeed and sft_config.gradient_accumulation_steps > 1:
        # DeepSpeed steps inside the last micro-batch's backward; a skipped one would carry the
        # step's other gradients into the next step instead of dropping them
        raise ConfigError(f"--max_bad_steps {sft_config.max_bad_steps} with --deepspeed needs --gradient_accumulation_steps 1 "
                          f"(got {sft_config.gradient_accumulation_steps}); raise --per_device_train_batch_size instead")
    return recipe


def _require(value, flag: str, allowed: str, ok) -> None:
    if not ok(value):
        shown = f"{value:g}" if isinstance(value, float) else value  # as typed: --lora_alpha 0, not 0.0
        raise ConfigError(f"{flag} {shown}: must be {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_target_modules(targets):
    """The targets as train() passes them on: checked, and a bare module name from a YAML file
    (a string there, where a flag gives a list) made a list of one. A string peft would read as
    a regex over full names, which a bare name like q_proj never matches."""
    if targets is None:
        return None
    if isinstance(targets, str) and targets != ALL_LINEAR and re.fullmatch(r"[A-Za-z0-9_]+", targets):
        targets = [targets]
    names = [targets] if isinstance(targets, str) else list(targets)
    shown = " ".join(map(str, names))
    if not names or any(not isinstance(n, str) or not n.strip() for n in names):
        raise ConfigError(f"--target_modules {shown!r}: must be module names (e.g. --target_modules q_proj v_proj) or {ALL_LINEAR}")
    if any("," in n for n in names):
        raise ConfigError(f"--target_modules {shown}: separate module names with spaces (--target_modules q_proj v_proj), not commas")
    if ALL_LINEAR in names and len(names) > 1:
        raise ConfigError(f"--target_modules {shown}: {ALL_LINEAR} already means every linear layer of the transformer "
                          "blocks; give it alone, or list the modules")
    return targets
