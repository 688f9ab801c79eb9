"""bf16 autocast on CPUs with bf16 units: when it is chosen, and that training really runs in it."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asymllm import LoRASYMConfig, get_lorasym_model, lora_layers
from asymllm.data import Example
from asymllm.tiny import save_tiny_model
from asymllm.tokenizer import ensure_chat_template, ensure_pad_token
from asymllm.training.config import ConfigError, RunConfig, parse_train_args
from asymllm.training.precision import choose_cpu_autocast, cpu_bf16_units
from asymllm.training.tokenize import tokenize_examples
from asymllm.training.trainer import LorasymSFTTrainer


@pytest.mark.parametrize("flags, expected", [
    ("fpu vme sse avx512f avx512_bf16 amx_bf16 amx_tile", "amx_bf16"),
    ("fpu vme sse avx512f avx512_bf16", "avx512_bf16"),
    ("fpu vme sse avx2", None),
])
def test_bf16_units_are_read_from_cpuinfo(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_bf16_units(str(cpuinfo)) == expected


def test_no_cpuinfo_means_no_units(tmp_path):
    assert cpu_bf16_units(str(tmp_path / "absent")) is None


@pytest.mark.parametrize("asked, units, expected, said", [
    (None, "amx_bf16", False, "--cpu_autocast_bf16 true for bf16 autocast"),  # measured not to pay: opt-in
    (None, None, False, "reports no bf16 units"),
    (False, "amx_bf16", False, "(--cpu_autocast_bf16 false)"),
    (True, "avx512_bf16", True, "bf16 autocast on CPU (avx512_bf16), fp32 master weights"),
])
def test_autocast_is_opt_in_and_the_log_says_what_was_chosen(asked, units, expected, said):
    on, line = choose_cpu_autocast(asked, units, cuda=False)
    assert on is expected and line.startswith("precision: ") and said in line


def test_autocast_asked_where_it_cannot_run_names_the_flag():
    with pytest.raises(ValueError, match="--cpu_autocast_bf16 true: this CPU reports no bf16 units"):
        choose_cpu_autocast(True, None, cuda=False)
    with pytest.raises(ValueError, match="--cpu_autocast_bf16 true: this machine has a GPU"):
        choose_cpu_autocast(True, "amx_bf16", cuda=True)
    assert choose_cpu_autocast(None, "amx_bf16", cuda=True) == (False, "")


def test_the_flag_resolves_the_choice_on_this_machine(tmp_path):
    out = ["--output_dir", str(tmp_path)]
    assert parse_train_args(out)[3].cpu_autocast_bf16 is False
    assert parse_train_args(out + ["--cpu_autocast_bf16", "false"])[3].cpu_autocast_bf16 is False
    if cpu_bf16_units() is None or torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--cpu_autocast_bf16 true"):
            parse_train_args(out + ["--cpu_autocast_bf16", "true"])
    else:
        assert parse_train_args(out + ["--cpu_autocast_bf16", "true"])[3].cpu_autocast_bf16 is True


@pytest.mark.parametrize("autocast", [True, False])
def test_training_forwards_run_in_bf16_with_fp32_master_weights(tmp_path, autocast):
    """The adapter's matmuls see bf16 under autocast (fp32 without), the weights and the
    optimizer stay fp32, and B trains either way."""
    tiny = save_tiny_model(str(tmp_path / "tiny"))
    model = AutoModelForCausalLM.from_pretrained(tiny)
    model = get_lorasym_model(model, LoRASYMConfig(recipe="A_rand_hB_zero", r=4, seed=0))
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    ensure_chat_template(tokenizer), ensure_pad_token(tokenizer)
    examples = [Example([{"role": "user", "content": f"add {i} and {i}"}, {"role": "assistant", "content": str(2 * i)}], f"x:{i}")
                for i in range(8)]
    dataset, _ = tokenize_examples(examples, tokenizer, max_length=64)
    seen, lora_B_calls = [], []
    _, layer = next(lora_layers(model))
    # the adapted layer's output: the fused frozen-A node computes base and adapter in one (no lora_B call),
    # under autocast as well as without it
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    layer.lora_B["default"].register_forward_hook(lambda *_: lora_B_calls.append(1))
    before = layer.lora_B["default"].weight.detach().clone()
    args = RunConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, report_to="none",
                     save_strategy="no", learning_rate=1e-2, bf16=False, cpu_autocast_bf16=autocast)
    trainer = LorasymSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16 if autocast else torch.float32}
    assert lora_B_calls == [] and "fused frozen A" in model.lorasym_adapter_path
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = [s for group in trainer.optimizer.state.values() for s in group.values() if torch.is_tensor(s) and s.dim()]
    assert state and all(s.dtype == torch.float32 for s in state)
    assert not torch.equal(before, layer.lora_B["default"].weight.detach())
