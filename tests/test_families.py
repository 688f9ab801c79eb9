"""Model families beyond Llama and Mistral (Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3), built tiny from
their configs: default targets from the layer names, Phi-3's fused projections, training with
`asymllm train`, a merged HF export that loads in plain transformers, and GGUF's refusal."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from asymllm import LoRASYMConfig, get_lorasym_model, lora_layers
from asymllm.adapters.targets import FUSED_LIKE, LLAMA_LIKE, TargetError
from asymllm.export.command import ExportError, export
from asymllm.tiny import save_tiny_model, tiny_causal_lm
from asymllm.training.train import main as train_main

FAMILIES = ["qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
R = 4


@pytest.mark.parametrize("arch", FAMILIES)
def test_default_targets_are_every_blocks_projections(arch):
    model = get_lorasym_model(tiny_causal_lm(arch), LoRASYMConfig(recipe="asym", r=R))
    names = [name.rsplit(".", 1)[-1] for name, _ in lora_layers(model)]
    layout = FUSED_LIKE if arch == "phi3" else LLAMA_LIKE
    assert sorted(set(names)) == sorted(layout)
    assert len(names) == len(layout) * model.config.num_hidden_layers


def test_fused_projections_take_the_svd_of_the_whole_fused_matrix_and_say_so(caplog):
    base = tiny_causal_lm("phi3")
    weights = {name: module.weight.detach().clone() for name, module in base.named_modules()
               if name.endswith(("qkv_proj", "gate_up_proj"))}
    with caplog.at_level(logging.INFO, logger="asymllm.adapters.model"):
        model = get_lorasym_model(base, LoRASYMConfig(recipe="hA_V_hB_U", r=R))
    assert "qkv_proj holds q, k and v" in caplog.text and "SVD of the whole fused matrix" in caplog.text
    checked = 0
    for name, layer in lora_layers(model):
        key = name.removeprefix("base_model.model.")
        if key not in weights:
            continue
        u, _, vh = torch.linalg.svd(weights[key].float(), full_matrices=False)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.shape == (R, weights[key].shape[1]) and b.shape == (weights[key].shape[0], R)  # one adapter: all of q, k, v
        torch.testing.assert_close(a, vh[:R], atol=1e-5, rtol=0)
        torch.testing.assert_close(b, u[:, :R], atol=1e-5, rtol=0)
        checked += 1
    assert checked == 2 * model.config.num_hidden_layers


def test_frozen_A_on_a_fused_projection_is_frozen_whole():
    model = get_lorasym_model(tiny_causal_lm("phi3"), LoRASYMConfig(recipe="asym", r=R))
    fused = [(name, layer) for name, layer in lora_layers(model) if name.endswith("qkv_proj")]
    assert fused and all(not layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
                         for _, layer in fused)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{i} plus {i + 1} is {2 * i + 1}."} for i in range(16)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("arch", FAMILIES)
def test_trains_with_default_targets_and_exports_a_merged_model_plain_transformers_loads(arch, small_data, tmp_path):
    base = save_tiny_model(tmp_path / "base", arch=arch)
    out = tmp_path / "run"
    train_main(["--model", base, "--dataset", small_data, "--output_dir", str(out), "--max_steps", "3",
                "--per_device_train_batch_size", "4", "--learning_rate", "5e-2", "--save_strategy", "no",
                "--logging_steps", "1", "--max_length", "64"])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(FUSED_LIKE if arch == "phi3" else LLAMA_LIKE)
    merged = tmp_path / "merged"
    result = export(adapter=str(out / "adapter"), output=str(merged), dtype="fp32")
    assert result.verification.passed  # the export's own logits check against base + adapter
    plain = AutoModelForCausalLM.from_pretrained(merged)
    original = AutoModelForCausalLM.from_pretrained(base)
    ids = torch.tensor([[5, 17, 40, 99, 3, 250]])
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, original(ids).logits, atol=1e-6)  # the trained adapter is in it
    with pytest.raises(ExportError, match=rf"a {type(plain).__name__} model; --format gguf writes"):
        export(adapter=str(out / "adapter"), output=str(tmp_path / "gguf"), format="gguf")
