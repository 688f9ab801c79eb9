"""Adapters saved in standard peft format: reload in plain peft, reload exactly in asymllm, merge."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from asymllm import AdapterFileError, LoRASYMConfig, get_lorasym_model, load_lorasym_model, lora_layers, merge_lorasym
from asymllm.adapters.merge import MergeError
from asymllm.tiny import tiny_causal_lm
from test_adapter import R, train_steps


@pytest.fixture
def trained(tiny_llama, token_batch):
    """A_rand_hB_zero after a few steps, so B is non-zero and the adapter matters."""
    model = get_lorasym_model(tiny_llama, LoRASYMConfig(recipe="A_rand_hB_zero", r=R, lora_alpha=8, seed=11))
    train_steps(model, token_batch)
    return model.eval()


def test_saved_adapter_is_standard_peft_with_frozen_A(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "lorasym.json"} <= set(os.listdir(tmp_path))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    a_keys = [k for k in tensors if ".lora_A." in k]
    assert len(a_keys) == len(list(lora_layers(trained))) == len([k for k in tensors if ".lora_B." in k])
    record = json.loads((tmp_path / "lorasym.json").read_text())
    assert record["recipe"] == "A_rand_hB_zero" and record["seed"] == 11
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == R


PLAIN_PEFT = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base_dir, adapter_dir, batch_file, out_file = sys.argv[1:]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        logits = model(torch.load(batch_file)).logits
    assert not any(m.startswith("asymllm") for m in sys.modules), "asymllm was imported"
    torch.save(logits, out_file)
""")


def test_plain_peft_loads_it_in_a_process_without_asymllm(trained, tmp_path, token_batch):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_causal_lm(seed=0).save_pretrained(base_dir)
    trained.save_pretrained(adapter_dir)
    torch.save(token_batch, tmp_path / "batch.pt")
    script = tmp_path / "plain_peft.py"
    script.write_text(PLAIN_PEFT)
    subprocess.run([sys.executable, str(script), str(base_dir), str(adapter_dir), str(tmp_path / "batch.pt"),
                    str(tmp_path / "logits.pt")], check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    with torch.no_grad():
        expected = trained(token_batch).logits
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max() <= 1e-5


def test_asymllm_reload_restores_recipe_and_trainability(trained, tmp_path, token_batch):
    trained.save_pretrained(tmp_path)
    reloaded = load_lorasym_model(tiny_causal_lm(seed=0), str(tmp_path), is_trainable=True)
    assert reloaded.lorasym_recipe.name == "A_rand_hB_zero" and reloaded.lorasym_seed == 11
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            assert param.requires_grad == ("lora_B" in name), name
            assert torch.equal(param, dict(trained.named_parameters())[name])
    with torch.no_grad():
        assert (reloaded(token_batch).logits - trained(token_batch).logits).abs().max() <= 1e-6


def test_adapter_missing_its_frozen_A_is_refused(trained, tmp_path):
    # What transformers' Trainer writes under ZeRO-3: only the trainable B tensors.
    trained.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if ".lora_A." not in k}, weights)
    with pytest.raises(AdapterFileError, match="lack a factor.*no lora_A"):
        load_lorasym_model(tiny_causal_lm(seed=0), str(tmp_path))


def test_empty_tensors_are_refused(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: torch.empty(0) for k in load_file(weights)}, weights)
    with pytest.raises(AdapterFileError, match="zero-size tensors"):
        load_lorasym_model(tiny_causal_lm(seed=0), str(tmp_path))


def test_adapter_for_another_shape_is_refused(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match="does not fit this base model.*size mismatch"):
        load_lorasym_model(tiny_causal_lm(seed=0, hidden_size=32, num_heads=2, num_kv_heads=1), str(tmp_path))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_equals_W0_plus_sBA_and_matches_logits(tiny_llama, token_batch, use_rslora):
    model = get_lorasym_model(tiny_llama, LoRASYMConfig(recipe="hA_V_hB_U", r=R, lora_alpha=16, use_rslora=use_rslora))
    train_steps(model, token_batch, steps=2)
    model.eval()
    scale = 16 / (R ** 0.5 if use_rslora else R)
    layer = dict(lora_layers(model))["base_model.model.model.layers.1.mlp.down_proj"]
    expected_w = layer.base_layer.weight + scale * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    expected_w = expected_w.detach().clone()
    with torch.no_grad():
        adapter_logits = model(token_batch).logits
    merged = merge_lorasym(model)
    torch.testing.assert_close(merged.model.layers[1].mlp.down_proj.weight, expected_w, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert (merged(token_batch).logits - adapter_logits).abs().max() <= 1e-5
    with pytest.raises(MergeError, match="already merged"):
        merge_lorasym(merged)


def test_merging_twice_in_peft_is_harmless(trained, token_batch):
    with torch.no_grad():
        expected = trained(token_batch).logits
    trained.merge_adapter()
    with pytest.warns(UserWarning, match="already merged"):
        trained.merge_adapter()
    with torch.no_grad():
        assert (trained(token_batch).logits - expected).abs().max() <= 1e-5
