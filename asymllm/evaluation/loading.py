"""The model under evaluation: a base model, a base + adapter (unmerged, through peft), or a
merged export. One function, so every evaluation loads models the same way."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..attention import attention_for
from ..adapters.files import adapter_base_model, load_lorasym_model
from ..builtin import resolve_model
from ..data import DataError
from ..fingerprint import adapter_fingerprint, model_fingerprint
from ..tokenizer import use_trained_chat_template

logger = logging.getLogger(__name__)


class EvalModelError(ValueError):
    pass


def load_for_eval(model: str | None = None, adapter: str | None = None, dtype: str = "auto",
                  attn_implementation: str = "sdpa", device: str | None = None, chat_template: str | None = None,
                  quantization=None):
    """(model in eval mode, tokenizer, a short description). `model` defaults to the adapter's
    recorded base, else the built-in default; `dtype` auto = bf16 on CUDA, fp32 on CPU. The chat
    template: the one saved with the adapter, else `chat_template` (asymllm.tokenizer.use_trained_chat_template).
    `quantization` (asymllm.quantization.Quantization): the base loads in 4 or 8 bits, on `device`."""
    path = resolve_model(evaluated_model(model, adapter))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _dtype(dtype, device)
    tokenizer_source = adapter if adapter and os.path.exists(os.path.join(adapter, "tokenizer_config.json")) else path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    try:
        logger.info(use_trained_chat_template(tokenizer, chat_template, saved_by_training=tokenizer_source == adapter))
    except DataError as error:
        raise EvalModelError(str(error)) from None
    attn_implementation, note = attention_for(path, attn_implementation)
    if note:
        logger.info(note)
    quantized = quantization is not None and quantization.enabled
    if quantized:
        _check_quantization(quantization)
    compute = str(torch_dtype).removeprefix("torch.")
    network = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation,
                                                   **(quantization.load_kwargs(compute, device) if quantized else {}))
    if quantized:
        from ..quantization import release_checkpoint_memory

        release_checkpoint_memory(network)  # the checkpoint pages the quantizing load kept mapped
    if adapter:
        network = load_lorasym_model(network, adapter)
    if not quantized:  # a quantized model was placed while it loaded, and cannot be moved
        network.to(device)
    network.eval()
    description = (f"{path}" + (f" + adapter {adapter}" if adapter else "") + f" ({compute}, {device}"
                   + (f"; base {quantization.describe(compute)})" if quantized else ")"))
    logger.info("evaluating %s", description)
    return network, tokenizer, description


def evaluated_model(model: str | None, adapter: str | None) -> str | None:
    """The base `load_for_eval` loads: `model`, else the adapter's recorded base (None: the default)."""
    if adapter is not None and not os.path.isdir(adapter):
        raise EvalModelError(f"--adapter {adapter}: no such folder")
    return model or (adapter_base_model(adapter) if adapter else None)


def _check_quantization(quantization) -> None:
    from ..quantization import QuantizationError

    try:
        quantization.check()
    except QuantizationError as error:
        raise EvalModelError(str(error)) from None


def evaluated_fingerprints(model: str | None, adapter: str | None, quantization=None) -> dict:
    """{"model": ..., "adapter": ...} (asymllm.fingerprint) of what `load_for_eval(model, adapter)`
    evaluates: results are bound to these files, not to the paths they were given by."""
    found = {"model": model_fingerprint(evaluated_model(model, adapter))}
    if adapter:
        found["adapter"] = adapter_fingerprint(adapter)
    if quantization is not None and quantization.enabled:  # a 4-bit result is not a full-precision one
        found["base_quantization"] = {"name": quantization.describe(), **quantization.record()}  # known by name
    return found


def _dtype(name: str, device: str) -> torch.dtype:
    choices = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in choices:
        raise EvalModelError(f"--dtype {name!r}: choose one of auto, {', '.join(choices)}")
    return choices[name]
