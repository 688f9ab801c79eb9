"""The vLLM serving commands the model cards state: the smallest --max-lora-rank vLLM accepts
that holds the adapter's rank (vLLM itself is not installable here)."""

from __future__ import annotations

import pytest

from asymllm.serving import vllm_adapter_command, vllm_max_lora_rank, vllm_merged_command


@pytest.mark.parametrize("r, expected", [(1, 1), (2, 8), (8, 8), (9, 16), (16, 16), (24, 32), (33, 64), (256, 256),
                                         (257, 320), (320, 320), (321, 512), (512, 512), (513, None)])
def test_max_lora_rank_is_the_smallest_value_vllm_accepts_that_holds_the_rank(r, expected):
    assert vllm_max_lora_rank(r) == expected


def test_commands():
    assert vllm_adapter_command("meta-llama/Llama-2-7b-hf", "asym-r24", "/runs/asym r24/adapter", 24) == (
        "vllm serve meta-llama/Llama-2-7b-hf --enable-lora --lora-modules 'asym-r24=/runs/asym r24/adapter' --max-lora-rank 32")
    assert vllm_adapter_command("base", "n", "/a", 600).startswith("# rank 600 is above vLLM's largest --max-lora-rank (512)")
    assert vllm_merged_command("/exports/merged") == "vllm serve /exports/merged"
