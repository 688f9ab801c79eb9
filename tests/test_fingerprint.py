"""asymllm.fingerprint: what a result measured (files, not paths), and ResumeLog's use of it.

The end-to-end checks (a second adapter or model in the same folder is refused by
`asymllm eval mmlu` / `eval alpaca`, re-evaluated by `asymllm sweep`) are in test_mmlu.py,
test_alpaca_eval.py and test_sweep.py; here, the rules themselves on small files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from asymllm import builtin, fingerprint
from asymllm.evaluation.resume import ResumeError, ResumeLog
from asymllm.fingerprint import adapter_fingerprint, fingerprint_changes, fingerprint_record, model_fingerprint

MIB = 1 << 20


def write(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def fake_adapter(folder, weights: bytes = b"w" * 100, recipe: bool = True) -> str:
    write(os.path.join(folder, "adapter_model.safetensors"), weights)
    write(os.path.join(folder, "adapter_config.json"), b'{"r": 4}')
    if recipe:
        write(os.path.join(folder, "lorasym.json"), b'{"recipe": "A_rand_hB_zero", "seed": 0}')
    write(os.path.join(folder, "README.md"), b"not part of the fingerprint")
    return str(folder)


def fake_model(folder, weights: bytes = b"m" * 100) -> str:
    write(os.path.join(folder, "config.json"), b'{"model_type": "llama"}')
    write(os.path.join(folder, "model-00001-of-00002.safetensors"), weights)
    write(os.path.join(folder, "model-00002-of-00002.safetensors"), b"second shard")
    write(os.path.join(folder, "pytorch_model.bin"), b"bin")
    write(os.path.join(folder, "model.Q4_1.gguf"), b"gguf")
    write(os.path.join(folder, "tokenizer.json"), b"{}")  # tokenizers, READMEs: not the model's numbers
    return str(folder)


def test_adapter_fingerprint_is_the_sha256_of_its_files_and_not_of_its_path(tmp_path):
    adapter = fake_adapter(tmp_path / "a")
    found = adapter_fingerprint(adapter)
    assert sorted(found["files"]) == ["adapter_config.json", "adapter_model.safetensors", "lorasym.json"]
    assert found["files"]["adapter_model.safetensors"] == {"size": 100, "sha256": hashlib.sha256(b"w" * 100).hexdigest()}
    moved = shutil.copytree(adapter, tmp_path / "elsewhere")
    assert adapter_fingerprint(moved)["id"] == found["id"]
    assert fingerprint_changes({"adapter": found}, {"adapter": adapter_fingerprint(moved)}) == {}
    assert "lorasym.json" not in adapter_fingerprint(fake_adapter(tmp_path / "peft", recipe=False))["files"]

    write(os.path.join(adapter, "adapter_model.safetensors"), b"W" * 100)  # same size, other bytes
    changes = fingerprint_changes({"adapter": found}, {"adapter": adapter_fingerprint(adapter)})
    assert list(changes) == ["adapter"] and "adapter_model.safetensors changed" in changes["adapter"]
    assert "adapter_config.json" not in changes["adapter"]


def test_model_fingerprint_covers_config_and_every_weight_file(tmp_path):
    model = fake_model(tmp_path / "m")
    found = model_fingerprint(model)
    assert found["path"] == os.path.abspath(model) and "note" not in found
    assert sorted(found["files"]) == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                      "model.Q4_1.gguf", "pytorch_model.bin"]
    write(os.path.join(model, "config.json"), b'{"model_type": "mistral"}')
    assert "config.json changed" in fingerprint_changes({"model": found}, {"model": model_fingerprint(model)})["model"]
    os.remove(os.path.join(model, "model-00002-of-00002.safetensors"))
    changes = fingerprint_changes({"model": found}, {"model": model_fingerprint(model)})
    assert "model-00002-of-00002.safetensors removed" in changes["model"]


def test_big_weight_files_are_hashed_at_their_ends_with_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "WHOLE_HASH_LIMIT", 3 * MIB)  # stands in for 64 MiB
    data = bytearray(os.urandom(5 * MIB))
    model = fake_model(tmp_path / "m", weights=bytes(data))
    before = model_fingerprint(model)
    record = before["files"]["model-00001-of-00002.safetensors"]
    assert record["hashed"] == "partial" and record["size"] == 5 * MIB
    assert record["sha256"] == hashlib.sha256(bytes(data[:MIB] + data[-MIB:])).hexdigest()
    assert record["mtime_ns"] == os.stat(os.path.join(model, "model-00001-of-00002.safetensors")).st_mtime_ns
    assert "hashed" not in before["files"]["config.json"]  # small files: whole

    def changes_after(edit_byte: int, mtime_shift_ns: int) -> dict:
        path = os.path.join(model, "model-00001-of-00002.safetensors")
        changed = bytearray(data)
        changed[edit_byte] ^= 0xFF
        write(path, bytes(changed))
        os.utime(path, ns=(record["mtime_ns"], record["mtime_ns"] + mtime_shift_ns))
        return fingerprint_changes({"model": before}, {"model": model_fingerprint(model)})

    assert "model-00001-of-00002.safetensors changed (sha256" in changes_after(-1, 0)["model"]  # the last MiB
    assert "model-00001-of-00002.safetensors changed (sha256" in changes_after(0, 0)["model"]  # the first MiB
    assert "changed (size or mtime" in changes_after(2 * MIB, 10**9)["model"]  # the middle, rewritten: a new mtime
    assert changes_after(2 * MIB, 0) == {}  # the middle with the mtime put back: the documented blind spot


def test_a_hub_name_is_known_by_its_name_alone_when_not_cached(tmp_path):
    name = "asymllm-tests/no-such-model"  # neither a folder nor in the local HF cache; no network asked
    found = model_fingerprint(name)
    assert found["name"] == name and found["path"] is None and found["files"] == {} and "name alone" in found["note"]
    assert fingerprint_changes({"model": found}, {"model": model_fingerprint(name)}) == {}
    # Not cached then (downloaded by that run), cached now: the name is all that can be compared.
    cached_now = {**model_fingerprint(fake_model(tmp_path / "snapshot")), "name": name}
    assert fingerprint_changes({"model": found}, {"model": cached_now}) == {}
    other = model_fingerprint("asymllm-tests/another-model")
    assert fingerprint_changes({"model": found}, {"model": other}) == {"model": f"{name} then, asymllm-tests/another-model now"}


def test_the_default_model_is_fingerprinted_in_the_folder_it_resolves_to(tmp_path, monkeypatch):
    converted = tmp_path / "cache" / builtin.CONVERTED_NAME
    fake_model(converted)
    write(os.path.join(converted, builtin.MARKER), b"{}")
    monkeypatch.setenv("ASYMLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(builtin, "hub_cache_snapshot", lambda name: None)  # as on a machine without the hub copy
    found = model_fingerprint(None)
    assert found["name"] == builtin.DEFAULT_MODEL and found["path"] == str(converted)
    assert "config.json" in found["files"] and "model-00001-of-00002.safetensors" in found["files"]


def test_record_id_tells_two_results_apart(tmp_path):
    model, adapter = model_fingerprint(fake_model(tmp_path / "m")), adapter_fingerprint(fake_adapter(tmp_path / "a"))
    with_adapter, without = fingerprint_record({"model": model, "adapter": adapter}), fingerprint_record({"model": model})
    assert with_adapter["id"] != without["id"] and with_adapter["adapter"] == adapter
    other = adapter_fingerprint(fake_adapter(tmp_path / "b", weights=b"x" * 100))
    assert fingerprint_record({"model": model, "adapter": other})["id"] != with_adapter["id"]


# --- ResumeLog ---------------------------------------------------------------------------------


def test_resume_log_refuses_results_of_another_adapter_and_names_it(tmp_path):
    adapter = fake_adapter(tmp_path / "a")
    log_path = str(tmp_path / "out" / "log.jsonl")
    found = {"adapter": adapter_fingerprint(adapter)}
    ResumeLog(log_path, {"shots": 0}, fingerprints=found).append([{"key": "q1"}])
    assert set(ResumeLog(log_path, {"shots": 0}, fingerprints=found).done) == {"q1"}  # same files: resumes

    write(os.path.join(adapter, "lorasym.json"), b'{"recipe": "A_rand_hB_zero", "seed": 1}')
    with pytest.raises(ResumeError, match=r"log\.jsonl holds results of another adapter \(adapter .*lorasym\.json changed"
                                          r".*\); use --overwrite to discard them, or another --output_dir$"):
        ResumeLog(log_path, {"shots": 0}, fingerprints={"adapter": adapter_fingerprint(adapter)})
    assert ResumeLog(log_path, {"shots": 0}, overwrite=True, fingerprints={"adapter": adapter_fingerprint(adapter)}).done == {}


def test_resume_log_without_results_takes_the_new_fingerprint(tmp_path):
    log_path = str(tmp_path / "log.jsonl")
    ResumeLog(log_path, {}, fingerprints={"model": model_fingerprint(fake_model(tmp_path / "m"))})
    other = {"model": model_fingerprint(fake_model(tmp_path / "m", weights=b"n" * 100))}
    ResumeLog(log_path, {}, fingerprints=other)  # nothing was evaluated: nothing to mix up
    assert json.loads(open(tmp_path / "log.settings.json").read())["fingerprints"] == json.loads(json.dumps(other))


def test_resume_log_refuses_results_recorded_without_fingerprints(tmp_path):
    """Results an older asymllm wrote (settings held paths only) cannot be told apart."""
    (tmp_path / "log.settings.json").write_text(json.dumps({"model": "m", "adapter": "a", "shots": 0}))
    (tmp_path / "log.jsonl").write_text('{"key": "q1"}\n')
    with pytest.raises(ResumeError, match="no record of what made them.*--overwrite"):
        ResumeLog(str(tmp_path / "log.jsonl"), {"shots": 0},
                  fingerprints={"model": model_fingerprint(fake_model(tmp_path / "m"))})


def test_an_adapter_saved_again_unchanged_keeps_its_fingerprint(tmp_path):
    # peft writes target_modules from a Python set: its order changes from one process to the
    # next (string hashing is randomised), so the same adapter saved twice differs byte for byte.
    first = fake_adapter(tmp_path / "one")
    second = fake_adapter(tmp_path / "two")
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "k_proj"]}
    write(os.path.join(first, "adapter_config.json"), json.dumps(config).encode())
    config["target_modules"] = ["k_proj", "q_proj", "v_proj"]
    write(os.path.join(second, "adapter_config.json"), json.dumps(config, indent=2).encode())
    assert fingerprint_changes({"adapter": adapter_fingerprint(first)}, {"adapter": adapter_fingerprint(second)}) == {}
    # ... while a real change of the configuration is still one
    config["lora_alpha"] = 16
    write(os.path.join(second, "adapter_config.json"), json.dumps(config).encode())
    changes = fingerprint_changes({"adapter": adapter_fingerprint(first)}, {"adapter": adapter_fingerprint(second)})
    assert "adapter_config.json changed" in changes["adapter"]
