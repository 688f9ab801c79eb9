"""Tiny Llama/Mistral models built from configs (random weights): for tests, demos and
benchmarks on machines without a model hub."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig}


def tiny_config(arch: str = "llama", vocab_size: int = 256, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128, max_positions: int = 512):
    if arch not in CONFIGS:
        raise ValueError(f"arch must be one of {sorted(CONFIGS)}, got {arch!r}")
    return CONFIGS[arch](
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
    )


def tiny_causal_lm(arch: str = "llama", seed: int = 0, **config_kwargs) -> torch.nn.Module:
    """A randomly initialised causal LM, identical for identical arguments."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs), attn_implementation="sdpa")
    return model.float().eval()
