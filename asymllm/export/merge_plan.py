"""What an export merges into what (every adapter tensor matched to a base weight, shapes
and scale checked before anything is written) and the streamed write of W0 + s * B @ A."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch

from .common import DTYPE_NAMES, PREFIX, WEIGHTS_INDEX, ExportError, write_text
from .safetensors_io import BaseCheckpoint, BaseReader, SafetensorsStreamWriter
from .source import AdapterSource

logger = logging.getLogger("asymllm.export")


# adapter_config.json features whose merge is not W0 + s*B@A: refused rather than merged wrongly.
UNSUPPORTED = ("use_dora", "lora_bias", "layer_replication", "target_parameters", "use_qalora",
               "trainable_token_indices", "use_bdlora", "alora_invocation_tokens")


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
    reader = BaseReader(base)
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
