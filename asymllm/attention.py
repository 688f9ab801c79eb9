"""Which attention implementation a model runs: the one asked for (or the machine's default:
flash_attention_2 where flash-attn and CUDA are present, else sdpa),
unless its family has no such path in transformers; then eager, said in the log. Gemma 2 has
no sdpa path (its attention logits are soft-capped, which sdpa cannot do), so without this a
Gemma 2 run would stop at model load with transformers' "does not support" error."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("asymllm.train")

FALLBACK = "eager"
SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}


def model_class(model_path: str):
    """The causal-LM class transformers builds for this model folder or hub name (None when unknown)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path)
        return AutoModelForCausalLM._model_mapping[type(config)]
    except (OSError, ValueError, KeyError):
        return None  # loading reports an unreadable model itself, with the flag that named it


class AttentionError(ValueError):
    """--attn_implementation names an implementation this model's family has no path for."""


def attention_for(model_path: str, wanted: str, explicit: bool = False) -> tuple[str, str | None]:
    """(implementation, log line or None): `wanted`, or, where the family cannot run it, eager
    for a default and AttentionError for an --attn_implementation the user gave."""
    cls = model_class(model_path)
    flag = SUPPORT_FLAGS.get(wanted)
    if cls is None or flag is None or getattr(cls, flag, True):
        return wanted, None
    supported = [name for name, support in SUPPORT_FLAGS.items() if getattr(cls, support, False)] + [FALLBACK]
    if explicit:
        raise AttentionError(f"--attn_implementation {wanted}: {cls.__name__} has no {wanted} path in this transformers; "
                             f"choose one of {', '.join(supported)}")
    return FALLBACK, (f"attention: {FALLBACK} ({cls.__name__} has no {wanted} path in this transformers; "
                      f"--attn_implementation chooses among {', '.join(supported)})")


def model_attention(model_path: str, requested: str | None) -> str:
    """The attention this run uses: --attn_implementation, else the machine's default (choose_attention),
    either within what the model's family can run (asymllm.attention)."""
    attn, note = attention_for(model_path, choose_attention(requested), explicit=bool(requested))
    if note:
        logger.info(note)
    return attn


def choose_attention(requested: str | None) -> str:
    if requested:
        return requested
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            logger.info("attention: flash_attention_2 (flash-attn %s on CUDA)", flash_attn.__version__)
            return "flash_attention_2"
        except ImportError:
            logger.info("attention: sdpa (flash-attn not installed: pip install 'asymllm[gpu]' --no-build-isolation for "
                        "flash_attention_2; sdpa runs torch's own FlashAttention kernel for bf16/fp16, but packed rows need "
                        "a block mask there, which only flash-attn's varlen kernel does without)")
            return "sdpa"
    logger.info("attention: sdpa (no CUDA; flash-attn needs a GPU)")
    return "sdpa"
