"""A merged model as one GGUF file for llama.cpp and ollama, written with the `gguf` package
(its writer, tensor-name map and quantizers), laid out as llama.cpp's convert_hf_to_gguf.py lays
out a LlamaForCausalLM or MistralForCausalLM (both are llama.cpp's `llama` architecture).

Every weight is merged in fp32 (W0 + s * B @ A, asymllm.export.merge_plan.merged_tensor), the
query and key projections permuted into the rotary layout llama.cpp expects (its
LlamaModel.permute), then cast or quantized and streamed to the file one tensor at a time: the
tensor table is written first from the shapes alone, so memory stays a few tensors.
Norms and other 1-D tensors stay f32, as llama.cpp keeps them; a weight whose rows do not split
into q8_0's blocks of 32 falls back to f16, as in llama.cpp.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .common import ExportError
from .gguf_vocab import GGUFVocab
from .merge_plan import MergePlan, merged_tensor
from .safetensors_io import BaseCheckpoint, BaseReader

logger = logging.getLogger("asymllm.export")

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
GGUF_TYPES = ("f16", "bf16", "f32", "q8_0")
SKIPPED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; llama.cpp computes them


@dataclass
class GGUFTensor:
    key: str            # base checkpoint key
    name: str           # GGUF tensor name
    shape: tuple[int, ...]
    qtype: object       # gguf.GGMLQuantizationType
    nbytes: int
    permute_heads: int | None = None  # q/k: the heads to permute by


def check_architecture(config: dict, where: str) -> None:
    """Refuse what this writer would get wrong, before anything is written."""
    arch = (config.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise ExportError(f"{where}: a {arch} model; --format gguf writes {' and '.join(ARCHITECTURES)} (llama.cpp's "
                          "llama architecture). Export --format hf and convert with llama.cpp's convert_hf_to_gguf.py")
    rope_type = rope_parameters(config).get("rope_type")
    if rope_type not in (None, "default"):
        # transformers' GGUF loader reads no rope scaling back for llama, so such a file could not be checked
        raise ExportError(f"{where}: rope scaling {rope_type!r}; --format gguf writes models without rope scaling "
                          "(Llama 2, Mistral, Llama 3.0, SmolLM2). Export --format hf and convert with llama.cpp's "
                          "convert_hf_to_gguf.py")
    biased = [flag for flag in ("attention_bias", "mlp_bias") if config.get(flag)]
    if biased:
        raise ExportError(f"{where}: {', '.join(biased)} set; --format gguf writes Llama/Mistral models without biases")
    window = config.get("sliding_window")
    if window and window < config.get("max_position_embeddings", 0):
        logger.warning("%s: sliding_window %d is not written: llama.cpp attends to the whole context with the llama "
                       "architecture (as its own converter does for Mistral)", where, window)


def plan_tensors(base: BaseCheckpoint, gguf_type: str) -> list[GGUFTensor]:
    """Each base tensor's GGUF name, shape and type, in the base's order; the tied output head
    is left out (llama.cpp then uses the token embedding, as the model does)."""
    import gguf

    config = base.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    tied = bool(config.get("tie_word_embeddings", False))
    planned = []
    for key, info in base.tensors.items():
        if key.endswith(SKIPPED) or (tied and key == "lm_head.weight"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"base model {base.directory}: tensor {key} has no llama.cpp name; --format gguf "
                              "writes plain Llama/Mistral checkpoints")
        qtype = tensor_type(name, info.shape, gguf_type)
        nbytes = math.prod(gguf.quant_shape_to_byte_shape(info.shape, qtype))
        permute = heads if key.endswith("q_proj.weight") else kv_heads if key.endswith("k_proj.weight") else None
        planned.append(GGUFTensor(key, name, tuple(info.shape), qtype, nbytes, permute))
    return planned


def tensor_type(name: str, shape: tuple[int, ...], gguf_type: str):
    """llama.cpp's choice: 1-D tensors and norms f32; the rest in the asked type (q8_0 needs rows
    that split into blocks of 32, else f16)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    wanted = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gguf_type]
    if wanted == Q.Q8_0 and shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return wanted


def write_gguf(path: str, base: BaseCheckpoint, plan: MergePlan, tensors: list[GGUFTensor], vocab: GGUFVocab,
               gguf_type: str, name: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    add_metadata(writer, base.config, name, gguf_type)
    vocab.add_to(writer)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    last_log = time.perf_counter()
    with BaseReader(base) as reader:
        for done, t in enumerate(tensors, 1):
            writer.write_tensor_data(gguf_data(t, merged_tensor(t.key, reader.read(t.key), plan, torch.float32)))
            if time.perf_counter() - last_log > 10:
                logger.info("wrote %d / %d tensors", done, len(tensors))
                last_log = time.perf_counter()
    writer.close()


def gguf_data(t: GGUFTensor, merged: torch.Tensor) -> np.ndarray:
    """The tensor as the file stores it: permuted for llama.cpp's rope, then cast or quantized."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if t.permute_heads is not None:
        merged = permute(merged, t.permute_heads)
    data = quantize(merged.numpy(), t.qtype)
    if t.qtype in (Q.F16, Q.BF16) and not _finite(data, t.qtype):
        raise ExportError(f"merged tensor {t.key} overflows {t.qtype.name.lower()} (max |w| "
                          f"{merged.abs().max().item():.3g}); try --gguf_type bf16 or f32")
    return data


def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half layout of each
    head's rows into the interleaved pairs llama.cpp's rope uses."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _finite(data: np.ndarray, qtype) -> bool:
    from gguf import GGMLQuantizationType as Q

    if qtype == Q.BF16:  # stored as raw bytes: exponent all ones is inf or NaN
        bits = data.view(np.uint16)
        return not np.any((bits & 0x7F80) == 0x7F80)
    return bool(np.isfinite(data).all())


def rope_parameters(config: dict) -> dict:
    """rope_theta and rope_type from transformers 5's rope_parameters and 4's rope_theta + rope_scaling."""
    scaling = config.get("rope_scaling") or {}  # transformers gives it priority when both are there
    merged = {**(config.get("rope_parameters") or {}), **scaling}
    merged["rope_type"] = merged.get("rope_type", merged.get("type"))
    merged["rope_theta"] = merged.get("rope_theta") or config.get("rope_theta")
    return merged


def add_metadata(writer, config: dict, name: str, gguf_type: str) -> None:
    """The hyperparameters llama.cpp's TextModel/LlamaModel.set_gguf_parameters write."""
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name(name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
