"""Compact adapters (--save_frozen_as seed, asymllm/adapters/compact.py): frozen random factors
saved as seed + sha256, regenerated and hash-checked on load, converted back to plain peft."""

import json
import logging
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from asymllm import AdapterFileError, LoRASYMConfig, get_lorasym_model, load_lorasym_model, save_adapter
from asymllm.adapters import compact
from asymllm.export.command import main as export_main
from asymllm.tiny import save_tiny_model, tiny_causal_lm
from asymllm.training.config import ConfigError
from asymllm.training.train import main as train_main


def adapter(recipe="A_rand_hB_zero"):
    model = get_lorasym_model(tiny_causal_lm("llama", seed=0), LoRASYMConfig(recipe=recipe, r=8, seed=11))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(len(name)))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The same adapter saved both ways."""
    root = tmp_path_factory.mktemp("compact")
    model = adapter()
    save_adapter(model, str(root / "full"))
    save_adapter(model, str(root / "compact"), frozen_as="seed")
    return root / "full", root / "compact"


def test_a_compact_adapter_is_half_the_file_and_expands_to_the_same_tensors(saved):
    full, small = saved
    assert not (small / "adapter_model.safetensors").exists() and (small / compact.FROZEN_RECORD).exists()
    full_bytes = (full / "adapter_model.safetensors").stat().st_size
    small_bytes = (small / compact.COMPACT_WEIGHTS).stat().st_size + (small / compact.FROZEN_RECORD).stat().st_size
    assert small_bytes < 0.6 * full_bytes  # A (r x d_in) gone, B (d_out x r) kept, 14 small JSON entries
    expected, expanded = load_file(full / "adapter_model.safetensors"), compact.expanded_tensors(str(small))
    assert expected.keys() == expanded.keys()
    assert all(torch.equal(expanded[k], expected[k]) for k in expected)
    record = json.loads((small / compact.FROZEN_RECORD).read_text())
    assert len(record["factors"]) == 14 and all(e["init"] == "rand" and e["letter"] == "A" for e in record["factors"].values())


def test_load_regenerates_the_frozen_factors_and_plain_peft_refuses_the_compact_folder(saved, token_batch):
    full, small = saved
    logits = [load_lorasym_model(tiny_causal_lm("llama", seed=0), str(d))(input_ids=token_batch).logits for d in (full, small)]
    assert torch.equal(logits[0], logits[1])
    # never B beside a freshly initialised A: peft finds no adapter_model.safetensors, looks for a hub repo and stops
    with pytest.raises(Exception, match="Repo id|adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny_causal_lm("llama", seed=0), str(small))
    # what peft does not say, the folder's model card does: first, under peft's front matter
    card = (small / "README.md").read_text()
    assert card.startswith("---\nbase_model") and "library_name: peft" in card.split("\n---\n")[0]
    body = card.split("\n---\n", 1)[1].lstrip()
    assert body.startswith("> **A compact asymllm adapter.**") and "--format peft" in body.split("\n\n")[0]
    assert "A compact asymllm adapter" not in (full / "README.md").read_text()


@pytest.mark.parametrize("tamper", ["seed", "generator"])
def test_a_factor_that_regenerates_differently_is_an_error_naming_the_module(saved, tmp_path, monkeypatch, tamper):
    _, small = saved
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in os.listdir(small):
        (folder / name).write_bytes((small / name).read_bytes())
    if tamper == "seed":
        record = json.loads((folder / compact.FROZEN_RECORD).read_text())
        key = next(k for k in record["factors"] if ".layers.1.mlp.up_proj." in k)
        record["factors"][key]["seed"] += 1
        (folder / compact.FROZEN_RECORD).write_text(json.dumps(record))
        where = "model.layers.1.mlp.up_proj"
    else:  # another torch's generator: the same seed, numbers one ulp away
        real = compact.init_factor
        monkeypatch.setattr(compact, "init_factor", lambda *a, **k: torch.nextafter(real(*a, **k), torch.tensor(2.0)))
        where = r"model\.layers\.\d\.\w+\.\w+_proj"  # whichever is checked first
    with pytest.raises(AdapterFileError, match=f"frozen factor A of {where} .*regenerates to other numbers"):
        load_lorasym_model(tiny_causal_lm("llama", seed=0), str(folder))


def test_train_saves_compact_and_export_format_peft_writes_the_plain_adapter(tmp_path, caplog, token_batch):
    model_dir = save_tiny_model(str(tmp_path / "model"))
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        train_main(["--model", model_dir, "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "no",
                    "--save_frozen_as", "seed", "--logging_steps", "1"])
    assert "adapter saved compact (--save_frozen_as seed): 14 frozen factors as seeds" in caplog.text
    assert compact.is_compact(str(out / "adapter"))
    export_main(["--adapter", str(out), "--output", str(tmp_path / "plain"), "--format", "peft"])
    plain = PeftModel.from_pretrained(tiny_causal_lm("llama", seed=0).__class__.from_pretrained(model_dir), str(tmp_path / "plain"))
    ours = load_lorasym_model(tiny_causal_lm("llama", seed=0).__class__.from_pretrained(model_dir), str(out / "adapter"))
    assert torch.equal(plain(input_ids=token_batch).logits, ours(input_ids=token_batch).logits)


@pytest.mark.parametrize("recipe, value, message", [
    ("lora", "seed", "--save_frozen_as seed: recipe hA_he_hB_zero has no frozen rand/he/zero factor"),
    ("A_V_hB_zero", "seed", "V and U come from the base's SVD"),
    ("A_rand_hB_zero", "sed", "--save_frozen_as sed: choose one of tensor, seed"),
])
def test_save_frozen_as_refusals_name_the_flag(recipe, value, message):
    from asymllm.training.config import AdapterArguments, _check_save_frozen_as
    from asymllm.adapters.recipe import Recipe

    with pytest.raises(ConfigError, match=message):
        _check_save_frozen_as(value, Recipe.parse(AdapterArguments(recipe=recipe).recipe))
