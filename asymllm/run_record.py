"""A run's record, asymllm_run.json: written by `asymllm train` beside the adapter, read by
export and the model cards, so a result can always say what produced it.

Its `training_settings` are what shaped the training (by flag; the model and the data by the
sha256 of their files): every checkpoint's completion marker carries a copy
(training/checkpoints.py), and a resume under other settings is refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata

RUN_RECORD = "asymllm_run.json"

PACKAGES = ("asymllm", "torch", "transformers", "peft", "trl", "deepspeed", "accelerate", "datasets", "flash-attn")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the asymllm checkout, with '+dirty' when it has uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def write_run_record(output_dir, adapter_args, model_args, data_args, sft_config, recipe, model_path,
                     resumed_from: str | None = None, training_settings: dict | None = None,
                     chat_template: dict | None = None, quantization: dict | None = None,
                     adapter_path: str | None = None) -> str | None:
    """asymllm_run.json: everything needed to know what ran (rank 0 writes). A resumed run
    keeps the earlier invocations' commands, commits and versions under earlier_invocations."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    record = {
        "command": sys.argv,
        "recipe": recipe.name,
        "update_rule": recipe.to_update_rule(),
        "seed": sft_config.seed,
        "model_path": model_path,
        "adapter": dataclasses.asdict(adapter_args),
        "model": dataclasses.asdict(model_args),
        "data": dataclasses.asdict(data_args),
        "sft_config": json.loads(sft_config.to_json_string()),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if training_settings is not None:
        record["training_settings"] = training_settings
    record["base_quantization"] = quantization  # None: the base trained in full precision
    if adapter_path is not None:  # fused frozen-A or peft's forward, and why (adapters/fused.py)
        record["adapter_path"] = adapter_path
    if chat_template is not None:  # the template the data was rendered with; the adapter folder's tokenizer carries it
        record["chat_template"] = chat_template
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_RECORD)
    if resumed_from:  # keep how the first part was started, not only the resume
        record["resumed_from"] = resumed_from
        record["earlier_invocations"] = _earlier_invocations(path)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    return path


def _earlier_invocations(path: str) -> list[dict]:
    """The invocations recorded in an existing asymllm_run.json, oldest first (empty if none or unreadable)."""
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return []
    summary = {key: previous.get(key) for key in INVOCATION_KEYS}
    return [*previous.get("earlier_invocations", []), summary]


INVOCATION_KEYS = ("started", "command", "git_commit", "world_size", "versions")


def training_lines(run: dict | None) -> list[str]:
    """How a run trained (data, schedule, code), as markdown bullets for a model card."""
    if not run:
        return ["No asymllm_run.json beside the adapter: data and settings unknown."]
    data, sft = run.get("data", {}), run.get("sft_config", {})
    dataset = data.get("dataset") or "asymllm built-in instruction data"
    held_out = data.get("eval_dataset") or ("built-in held-out set" if not data.get("dataset") else
                                            f"{data.get('eval_fraction')} of the training data" if data.get("eval_fraction") else "none")
    steps = f"{sft['max_steps']} steps" if (sft.get("max_steps") or -1) > 0 else f"{sft.get('num_train_epochs')} epochs"
    batch = (sft.get("per_device_train_batch_size") or 0) * (sft.get("gradient_accumulation_steps") or 1) * run.get("world_size", 1)
    return [f"- data: {dataset} (split {data.get('dataset_split')}); held out: {held_out}",
            f"- schedule: {steps}, learning rate {sft.get('learning_rate')}, global batch {batch}, "
            f"max length {sft.get('max_length')}, packing {sft.get('packing')}, {_plural(run.get('world_size', 1), 'process')}"
            + (f", DeepSpeed {os.path.basename(str(sft['deepspeed']))}" if sft.get("deepspeed") else ""),
            f"- code: asymllm {run.get('versions', {}).get('asymllm')}, commit {run.get('git_commit')}"] + _base_line(run)


def _base_line(run: dict) -> list[str]:
    quant = run.get("base_quantization")
    if not quant:
        return []
    how = "8-bit (LLM.int8)" if quant.get("bits") == 8 else f"4-bit {quant.get('quant_type')}" + (
        " with nested quantization" if quant.get("nested") else "")
    return [f"- base: loaded in {how} by bitsandbytes during training (QLoRA), compute in {quant.get('compute_dtype', 'float16')}"]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def read_json(path: str) -> dict | None:
    """A JSON file of a run folder (the record, metrics.json, trainer_state.json, ...), or None
    when it is missing or unreadable: callers describe what they have."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


# --- the settings that shaped training: a checkpoint is continued only under the same ones

# Flags whose value changes what training computes: the model and the data (a local file or
# folder by the sha256 of its files), the data's order and position, the loss, the schedule,
# the optimizer, the precision, the sharding (with the world size, recorded beside them), the
# adapter (target_modules as peft resolved it, compared on the checkpoint's adapter files),
# and which checkpoint becomes the final adapter.
COMPARED_FLAGS = (
    "recipe", "lora_r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules",
    "model", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_storage", "dataset", "dataset_split", "eval_dataset", "eval_split", "eval_fraction", "max_length", "truncation_mode",
    "packing", "packing_strategy", "padding_free", "pad_to_multiple_of", "completion_only_loss", "assistant_only_loss",
    "dataset_text_field", "dataset_kwargs", "chat_template", "chat_template_path", "train_on_inputs", "eos_token", "pad_token", "label_names", "model_init_kwargs",
    "seed", "data_seed", "shuffle_dataset", "train_sampling_strategy", "length_column_name", "dataloader_drop_last",
    "dataloader_in_order", "ignore_data_skip",
    "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "auto_find_batch_size",
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args", "optim_target_modules",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "loss_type", "label_smoothing_factor", "average_tokens_across_devices", "neftune_noise_alpha", "router_aux_loss_coef",
    "bf16", "fp16", "cpu_autocast_bf16", "deepspeed", "fsdp", "fsdp_config", "parallelism_config",
    "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
)
# Flags that never block a resume, deliberately:
IGNORED_FLAGS = (
    # where the run writes and what it shows or reports: no weight changes with them
    "output_dir", "overwrite_output_dir", "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node",
    "logging_nan_inf_filter", "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name", "project",
    "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "include_num_input_tokens_seen", "skip_memory_metrics",
    "debug", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
    # when and how checkpoints are written, and which one to continue: the resume itself
    "save_strategy", "save_steps", "save_total_limit", "save_on_each_node", "save_only_model", "enable_jit_checkpoint",
    "restore_callback_states_from_checkpoint", "resume_from_checkpoint",
    # evaluation measures the run and never feeds its gradients (the held-out data itself is compared)
    "eval_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size", "prediction_loss_only", "eval_on_start",
    "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps", "include_for_metrics", "batch_eval_metrics",
    "bf16_full_eval", "fp16_full_eval", "eval_packing", "do_train", "do_eval", "do_predict",
    # speed and memory: the same arithmetic by other kernels or in another order of work, as on another
    # GPU; a relaunch after an out-of-memory error or on other machines may need to change them
    "attn_implementation", "activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "activation_offloading", "torch_compile", "torch_compile_backend", "torch_compile_mode",
    "use_liger_kernel", "liger_kernel_config", "use_cache", "torch_empty_cache_steps", "tf32", "full_determinism", "use_cpu",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context", "dataset_num_proc", "remove_unused_columns", "trust_remote_code",
    "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend", "ddp_timeout",
    # set per process or by the launcher (they differ between ranks, or between launch commands)
    "local_rank", "accelerator_config",
    # fault handling: the way on after a stop or a non-finite loss (a resume with --max_bad_steps N is the advice)
    "stop_after_steps", "max_bad_steps",
    # the fused frozen-A path computes peft's forward in fewer products (equal to fp32 rounding)
    "fused_frozen_a",
    # how the final adapter's frozen factors are written (as tensors or as hash-checked seeds), not what they are
    "save_frozen_as",
)
WORLD_SIZE = "world size"  # not a flag: the launcher's process count (global batch = per device x accumulation x this)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "chat_template.jinja")


def training_settings(adapter_args, model_args, data_args, sft_config, recipe, model_path: str, sources) -> dict:
    """{"--flag": value} of every flag not in IGNORED_FLAGS (a flag neither list names is compared:
    the safe side), plus the world size. `sources`: (training data, held-out data or None), as
    train() reads them. The same on every rank: computed from flags, environment and files."""
    values = {**dataclasses.asdict(adapter_args), **dataclasses.asdict(model_args), **dataclasses.asdict(data_args),
              **sft_config.to_dict()}
    source, eval_source = sources
    special = {"recipe": recipe.name, "model": model_identity(model_path), "dataset": data_identity(source),
               "eval_dataset": data_identity(eval_source) if eval_source else None,
               "deepspeed": config_identity(sft_config.deepspeed), "chat_template": template_identity(data_args.chat_template)}
    # target_modules: None (the default set) and the same set listed differ as flags, not as adapters
    names = sorted(set(values) - set(IGNORED_FLAGS) - {"target_modules"})
    settings = {f"--{name}": special.get(name, values[name]) for name in names}
    settings[WORLD_SIZE] = int(os.environ.get("WORLD_SIZE", "1"))
    return json.loads(json.dumps(settings, default=str))  # as it reads back from a file: tuples as lists, enums as names


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(model_path: str) -> dict:
    """{path, sha256 of its config, weight and tokenizer files}; a hub name not in the local cache:
    sha256 None (then its name is compared). Large weight files are hashed by size and their first
    and last MiB (fingerprint.py), without their mtime: a copy of the same model is the same model."""
    from .builtin import hub_cache_snapshot
    from .fingerprint import file_record, model_files

    folder = model_path if os.path.isdir(model_path) else hub_cache_snapshot(model_path)
    if not folder:
        return {"path": model_path, "sha256": None}
    files = {name: {k: v for k, v in found.items() if k != "mtime_ns"} for name, found in model_files(folder).items()}
    files.update({name: file_record(os.path.join(folder, name)) for name in TOKENIZER_FILES
                  if os.path.isfile(os.path.join(folder, name))})
    return {"path": model_path, "sha256": _digest(files)}


def data_identity(source: str) -> dict:
    """{path, sha256 of its content}: a local file hashed whole, a local folder file by file; a
    hub dataset (or a name that is no file, which loading then reports): sha256 None."""
    from .fingerprint import file_record
    from .records import source_identity

    path = source_identity(source)
    if os.path.isfile(path):
        return {"path": path, "sha256": file_record(path)["sha256"]}
    if os.path.isdir(path):
        files = {os.path.relpath(os.path.join(root, name), path): file_record(os.path.join(root, name))["sha256"]
                 for root, _, names in os.walk(path) for name in names if not name.startswith(".")}
        return {"path": path, "sha256": _digest(files)}
    return {"path": path, "sha256": None}


def template_identity(value: str | None) -> dict | None:
    """--chat_template by what it renders: a name or a Jinja file by the sha256 of its text (the
    tokenizer's own template is part of the model's identity, its tokenizer files)."""
    from .chat_templates import requested_text

    text = requested_text(value)
    return None if value is None else {"value": value, "sha256": hashlib.sha256(text.encode()).hexdigest() if text else None}


def config_identity(config) -> dict | None:
    """A DeepSpeed config (a JSON file, or a mapping from a --config YAML) by its content."""
    from .fingerprint import file_record, json_record

    if not config:
        return None
    if isinstance(config, dict):
        return {"path": "(inline)", "sha256": _digest(config)}
    if not os.path.isfile(config):
        return {"path": str(config), "sha256": None}
    try:
        return {"path": str(config), "sha256": json_record(config)["sha256"]}
    except ValueError:
        return {"path": str(config), "sha256": file_record(config)["sha256"]}
