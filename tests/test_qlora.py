"""A base loaded in 4 bits (QLoRA, NF4) or 8 bits through bitsandbytes, which runs on the CPU:
every recipe trains (frozen factors bit-identical, B moved, V/U from the dequantized weight), the
adapter reloads in plain peft onto the 4-bit and the full-precision base, a resume is exact, the
flags are checked before anything loads, and evaluation records that the base was quantized."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

pytest.importorskip("bitsandbytes")

from asymllm.evaluation.loading import evaluated_fingerprints, load_for_eval  # noqa: E402
from asymllm.quantization import Quantization, dequantized_weight  # noqa: E402
from asymllm.tiny import save_tiny_model  # noqa: E402
from asymllm.training.train import main  # noqa: E402

R = 4
NF4 = ["--load_in_4bit", "--bnb_4bit_quant_type", "nf4", "--use_bnb_nested_quant"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"instruction": f"Add {i} and {i + 2}.", "output": f"{i} plus {i + 2} is {2 * i + 2}."} for i in range(24)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def flags(model_dir, data, out, *extra) -> list[str]:
    return ["--model", model_dir, "--dataset", data, "--output_dir", str(out), "--lora_r", str(R), "--lora_alpha", "8",
            "--per_device_train_batch_size", "4", "--learning_rate", "2e-2", "--logging_steps", "1", "--seed", "5",
            "--max_length", "64", *extra]


def nf4_base(model_dir):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map={"": "cpu"})


def factors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("recipe", ["A_rand_hB_zero", "lora", "A_V_hB_zero", "hA_zero_B_U", "hA_he_hB_zero"])
def test_every_recipe_trains_on_a_4bit_base(recipe, model_dir, data, tmp_path):
    out = tmp_path / "run"
    main(flags(model_dir, data, out, "--recipe", recipe, "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "5",
               *NF4))
    first, last = factors(out / "checkpoint-1"), factors(out / "adapter")
    frozen = {"A_rand_hB_zero": "lora_A", "A_V_hB_zero": "lora_A", "hA_zero_B_U": "lora_B"}.get(recipe)
    trained = [k for k in last if frozen is None or frozen not in k]
    for key in last:
        if frozen and frozen in key:
            assert torch.equal(first[key], last[key]), f"{recipe}: frozen {key} changed"
    moved = max((last[k] - first[k]).abs().max().item() for k in trained)
    assert moved > 0, f"{recipe}: nothing trained after step 1"
    record = json.loads((out / "asymllm_run.json").read_text())
    assert record["base_quantization"] == {"bits": 4, "method": "bitsandbytes", "quant_type": "nf4", "nested": True,
                                           "compute_dtype": "float32", "quant_storage": "uint8"}
    if recipe == "A_V_hB_zero":  # A = top-r right singular vectors of the *dequantized* weight
        base = nf4_base(model_dir)
        layer = base.model.layers[0].self_attn.q_proj
        vh = torch.linalg.svd(dequantized_weight(layer), full_matrices=False)[2][:R]
        a = last["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        torch.testing.assert_close(a, vh, atol=1e-5, rtol=0)
        full = AutoModelForCausalLM.from_pretrained(model_dir).model.layers[0].self_attn.q_proj.weight
        full_vh = torch.linalg.svd(full.detach(), full_matrices=False)[2][:R]
        assert not torch.allclose(a.abs(), full_vh.abs(), atol=1e-3)  # not the full-precision weight's


@pytest.fixture(scope="module")
def nf4_run(model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4") / "run"
    main(flags(model_dir, data, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", *NF4))
    return out


def test_the_adapter_reloads_in_plain_peft_on_the_4bit_and_the_full_precision_base(nf4_run, model_dir):
    from peft import PeftModel

    ids = torch.tensor([[5, 17, 40, 99, 3, 250, 7]])
    on_4bit = PeftModel.from_pretrained(nf4_base(model_dir), str(nf4_run / "adapter")).eval()
    on_full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(nf4_run / "adapter")).eval()
    evaluated, _, description = load_for_eval(adapter=str(nf4_run / "adapter"), device="cpu",
                                              quantization=Quantization(load_in_4bit=True, use_bnb_nested_quant=True))
    assert "base 4-bit nf4 with nested quantization" in description
    with torch.no_grad():
        a, b, c = on_4bit(ids).logits, on_full(ids).logits, evaluated(ids).logits
    torch.testing.assert_close(c, a, atol=1e-5, rtol=0)  # asymllm's evaluation = plain peft on the same 4-bit base
    gap = (a - b).abs().max().item()
    assert 0 < gap < 1.0, gap  # quantization error: present, and small next to logits of size ~5


def test_a_4bit_base_takes_pefts_forward_and_the_record_says_why(nf4_run):
    record = json.loads((nf4_run / "asymllm_run.json").read_text())
    assert record["adapter_path"] == "adapter path: peft's LoRA forward (quantized base (14))"


def test_resume_of_a_4bit_run_is_exact(nf4_run, model_dir, data, tmp_path):
    out = tmp_path / "run"
    main(flags(model_dir, data, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--stop_after_steps",
               "2", *NF4))
    main(flags(model_dir, data, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
               "--resume_from_checkpoint", "auto", *NF4))
    resumed, straight = factors(out / "adapter"), factors(nf4_run / "adapter")
    assert max((resumed[k] - straight[k]).abs().max().item() for k in straight) <= 1e-6


def test_a_resume_without_the_quantization_it_was_trained_with_is_refused(nf4_run, model_dir, data, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(nf4_run, out)
    shutil.rmtree(out / "adapter")
    with pytest.raises(SystemExit):
        main(flags(model_dir, data, out, "--max_steps", "4", "--resume_from_checkpoint", "auto"))
    assert "--load_in_4bit: True in the checkpoint, False in this run" in capsys.readouterr().err


def test_8bit_base_trains(model_dir, data, tmp_path):
    out = tmp_path / "run"
    result = main(flags(model_dir, data, out, "--max_steps", "2", "--save_strategy", "no", "--load_in_8bit"))
    assert result["steps"] == 2
    assert json.loads((out / "asymllm_run.json").read_text())["base_quantization"]["bits"] == 8
    b = [v for k, v in factors(out / "adapter").items() if "lora_B" in k]
    assert all(torch.count_nonzero(t) > 0 for t in b)


@pytest.mark.parametrize("extra, message", [
    (["--load_in_4bit", "--load_in_8bit"], "--load_in_4bit and --load_in_8bit: give one"),
    (["--load_in_4bit", "--bnb_4bit_quant_type", "int4"], "--bnb_4bit_quant_type int4: must be one of nf4, fp4"),
    (["--use_bnb_nested_quant"], "--use_bnb_nested_quant: only with --load_in_4bit"),
    (["--load_in_4bit", "--bnb_4bit_compute_dtype", "float64"], "--bnb_4bit_compute_dtype float64: must be one of"),
])
def test_bad_quantization_flags_are_one_line_before_anything_loads(model_dir, data, tmp_path, extra, message):
    with pytest.raises(SystemExit) as error:
        main(flags(model_dir, data, tmp_path / "out", "--max_steps", "1", *extra))
    assert str(error.value).startswith("asymllm train: error: ") and message in str(error.value), str(error.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_without_bitsandbytes_the_line_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"--load_in_4bit needs bitsandbytes: pip install \"asymllm\[qlora\]\""):
        Quantization(load_in_4bit=True).check()


def test_a_quantized_evaluation_is_fingerprinted_as_such(nf4_run):
    adapter = str(nf4_run / "adapter")
    full = evaluated_fingerprints(None, adapter)
    four = evaluated_fingerprints(None, adapter, Quantization(load_in_4bit=True))
    assert "base_quantization" not in full and four["base_quantization"]["bits"] == 4
    from asymllm.fingerprint import fingerprint_changes, fingerprint_record

    assert fingerprint_record(full)["id"] != fingerprint_record(four)["id"]
    assert fingerprint_changes(full, four) == {"base_quantization": "none then, 4-bit nf4 (bitsandbytes), compute in float32 now"}


def test_alpaca_eval_and_chat_on_a_4bit_base(nf4_run, tmp_path, capsys):
    from asymllm.chat import main as chat
    from asymllm.evaluation.alpaca import main as alpaca

    adapter = str(nf4_run / "adapter")
    summary = alpaca(["--adapter", adapter, "--load_in_4bit", "--use_bnb_nested_quant", "--limit", "2",
                      "--max_new_tokens", "4", "--output_dir", str(tmp_path / "eval"), "--no_progress"])
    assert summary["fingerprint"]["base_quantization"]["bits"] == 4 and "base 4-bit nf4" in summary["model"]
    again = alpaca(["--adapter", adapter, "--limit", "2", "--max_new_tokens", "4", "--output_dir", str(tmp_path / "eval2"),
                    "--no_progress"])
    assert again["fingerprint"]["id"] != summary["fingerprint"]["id"]  # full precision: another result
    with pytest.raises(SystemExit, match=r"holds results of another base_quantization \(base_quantization 4-bit nf4"):
        alpaca(["--adapter", adapter, "--limit", "2", "--max_new_tokens", "4", "--output_dir", str(tmp_path / "eval"),
                "--no_progress"])  # the 4-bit run's folder: its results are not a full-precision evaluation's
    capsys.readouterr()
    chat(["--adapter", adapter, "--load_in_4bit", "--prompt", "Add 2 and 4.", "--max_new_tokens", "6"])
    assert capsys.readouterr().out.strip()  # one reply, from the 4-bit base + adapter


def test_export_of_a_4bit_run_merges_into_the_full_precision_base_and_measures_the_gap(nf4_run, model_dir, tmp_path):
    from asymllm.export.command import export

    result = export(adapter=str(nf4_run / "adapter"), output=str(tmp_path / "hf"), dtype="fp32")
    assert result.verification.passed  # merged = full-precision base + adapter, as ever
    gap = re.search(r"training used a 4-bit nf4 with nested quantization \(bitsandbytes\), compute in float32 base; this "
                    r"export merges into the full-precision base, whose logits with the adapter differ from the quantized "
                    r"base \+ adapter's by at most ([\d.e-]+) .*same argmax at (\d+) of (\d+) positions", result.checked)
    assert gap and 0 < float(gap.group(1)) < 1.0, result.checked
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "- base: loaded in 4-bit nf4 with nested quantization by bitsandbytes during training (QLoRA)" in card
    assert gap.group(0) in card
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not any("Params4bit" in type(p).__name__ for p in merged.parameters())  # a plain full-precision model
    gguf = export(adapter=str(nf4_run / "adapter"), output=str(tmp_path / "gguf"), format="gguf", gguf_type="f32")
    assert "training used a 4-bit nf4" in gguf.checked and "training used a 4-bit nf4" in (tmp_path / "gguf" / "README.md").read_text()



def test_layers_bitsandbytes_left_unquantized_are_named(model_dir):
    from asymllm.quantization import QuantizationError, check_layers_quantized

    full = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(QuantizationError, match=r"--load_in_4bit: bitsandbytes quantized no layer of this llama "
                                                r"model \(.*q_proj \(Linear\).*train it in full precision"):
        check_layers_quantized(full, 4)
    four = nf4_base(model_dir)
    assert check_layers_quantized(four, 4) is None  # every projection quantized, the head excluded
    four.model.layers[0].mlp.down_proj = torch.nn.Linear(128, 64)  # as a module transformers keeps out would be
    assert "stay in full precision" in check_layers_quantized(four, 4) and "down_proj (Linear)" in check_layers_quantized(four, 4)

# ---- 2 CPU ranks (gloo): plain DDP, ZeRO-2 and ZeRO-3 with a 4-bit base, each against one process

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
import sft_runs as runs  # noqa: E402

QUICK = ["--max_steps", "4", "--save_strategy", "no", "--load_in_4bit", "--lora_r", str(R), "--lora_alpha", "8"]


@pytest.fixture(scope="module")
def single_4bit(tmp_path_factory):
    out = tmp_path_factory.mktemp("q_single") / "out"
    model = runs.tiny_model_dir(tmp_path_factory)
    runs.launch([runs.single_command(out, model, *QUICK, "--per_device_train_batch_size", str(runs.GLOBAL_BATCH))],
                out.parent, what="4-bit single process")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("config", [None, "zero2.json", "zero3.json"])
def test_a_4bit_base_on_two_ranks_trains_as_one_process_does(config, single_4bit, tmp_path_factory):
    """Under ZeRO-3 the packed weights (stored in the training dtype) load whole on each rank and are
    partitioned when DeepSpeed starts; the adapter equals the single process's either way."""
    out = tmp_path_factory.mktemp("q_two") / "out"
    model = runs.tiny_model_dir(tmp_path_factory)
    extra = ["--deepspeed", str(runs.REPO / "ds_configs" / config)] if config else []
    result = runs.launch([runs.torchrun_command(out, model, *QUICK, "--per_device_train_batch_size",
                                                str(runs.GLOBAL_BATCH // 2), *extra)], out.parent, what=f"4-bit 2 ranks {config}")
    assert "done: 4 steps" in result.log
    two, one = runs.adapter_tensors(out / "adapter"), runs.adapter_tensors(single_4bit / "adapter")
    assert len(two) == runs.N_TENSORS and runs.max_abs_diff(two, one) <= 1e-6
    assert all(torch.count_nonzero(v) > 0 for k, v in two.items() if "lora_B" in k)
    assert runs.run_record(out)["base_quantization"]["bits"] == 4
    if config == "zero3.json":
        assert runs.run_record(out)["base_quantization"]["quant_storage"] == "float32"
