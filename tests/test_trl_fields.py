"""SFTConfig's fields as `asymllm train` flags: the ones asymllm does itself are refused with its own
way to the same thing (one line naming the flag), and --model_init_kwargs reaches the model load."""

from __future__ import annotations

import json

import pytest

from asymllm.tiny import save_tiny_model
from asymllm.training.train import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("flags, message", [
    (["--fsdp", "full_shard"], "--fsdp: asymllm shards with DeepSpeed (--deepspeed ds_configs/zero3.json"),
    (["--dataset_text_field", "prompt"], "--dataset_text_field prompt: asymllm reads instruction data itself"),
    (["--completion_only_loss", "false"], "--completion_only_loss false: asymllm puts the loss on the replies by default; "
                                          "--train_on_inputs puts it on every token"),
    (["--model_init_kwargs", '{"torch_dtype": "bfloat16"}'], "--model_init_kwargs torch_dtype: asymllm sets it from --bf16"),
    (["--model_init_kwargs", '{"attn_implementation": "eager"}'], "--model_init_kwargs attn_implementation: asymllm sets "
                                                                  "it from --attn_implementation"),
])
def test_fields_asymllm_does_itself_are_refused_with_its_way(model_dir, tmp_path, flags, message):
    with pytest.raises(SystemExit) as error:
        main(["--model", model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *flags])
    assert str(error.value).startswith("asymllm train: error: ") and message in str(error.value), str(error.value)
    assert not (tmp_path / "out" / "adapter").exists()


def test_use_liger_kernel_without_the_package_says_what_it_needs(model_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(SystemExit, match="--use_liger_kernel: needs the liger-kernel package .* NVIDIA GPUs only"):
        main(["--model", model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--use_liger_kernel", "true"])


def _first_loss(model_dir, out, *flags) -> float:
    main(["--model", model_dir, "--output_dir", str(out), "--max_steps", "1", "--logging_steps", "1",
          "--save_strategy", "no", "--eval_strategy", "no", "--seed", "3", *flags])
    return json.loads((out / "metrics.json").read_text())["first_logged_loss"]


def test_model_init_kwargs_reach_the_model_load_and_the_run_record(model_dir, tmp_path):
    plain = _first_loss(model_dir, tmp_path / "plain")
    # rms_norm_eps is a config field from_pretrained overrides: a huge epsilon flattens every normalised
    # activation, so the first loss (before any step) differs only if the keyword reached the load
    changed = _first_loss(model_dir, tmp_path / "eps", "--model_init_kwargs", '{"rms_norm_eps": 100.0}')
    assert abs(changed - plain) > 1e-3, (plain, changed)
    assert _first_loss(model_dir, tmp_path / "again") == pytest.approx(plain, abs=1e-6)
    record = json.loads((tmp_path / "eps" / "asymllm_run.json").read_text())
    assert record["sft_config"]["model_init_kwargs"] == {"rms_norm_eps": 100.0}
    assert record["training_settings"]["--model_init_kwargs"] == {"rms_norm_eps": 100.0}


@pytest.mark.parametrize("where", ["flag", "yaml"])
def test_warmup_ratio_says_what_replaced_it(model_dir, tmp_path, where):
    if where == "flag":
        argv = ["--warmup_ratio", "0.03"]
    else:
        (tmp_path / "run.yaml").write_text("warmup_ratio: 0.03\n")
        argv = ["--config", str(tmp_path / "run.yaml")]
    with pytest.raises(SystemExit, match=r"warmup_ratio.*transformers 5 removed warmup_ratio: warmup_steps below 1 is a "
                                         r"fraction of the run \(warmup_steps 0.03 = 3%\)"):
        main(["--model", model_dir, "--output_dir", str(tmp_path / "out"), *argv])


def test_the_example_config_parses_and_its_warmup_is_a_fraction():
    from pathlib import Path

    from asymllm.training.config import parse_train_args

    example = Path(__file__).resolve().parents[1] / "launch" / "run.example.yaml"
    _, _, _, sft_config = parse_train_args(["--config", str(example), "--bf16", "false", "--deepspeed", ""])
    assert sft_config.warmup_steps == 0.03 and sft_config.get_warmup_steps(1000) == 30


def test_push_to_hub_without_the_hub_is_refused_before_the_model_loads(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match=r"--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be pushed; leave "
                                         r"--push_to_hub out and upload the adapter folder later"):
        main(["--model", model_dir, "--output_dir", str(tmp_path / "out"), "--push_to_hub", "true"])
    assert not (tmp_path / "out").exists()
