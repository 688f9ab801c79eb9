"""`asymllm train`'s configuration: flag values checked before anything loads, the shipped
example config, unknown YAML keys, activation checkpointing's names, progress-bar choice."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist"))

import sft_runs as runs  # noqa: E402
from asymllm.training.config import ConfigError, parse_train_args  # noqa: E402
from asymllm.tiny import save_tiny_model  # noqa: E402
from asymllm.training.train import main  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "launch" / "run.example.yaml"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


# --- item 2: every asymllm flag checked before the data or the model load, one line naming it


@pytest.mark.parametrize("flags, line", [
    (["--lora_r", "0"], "--lora_r 0: must be a positive integer (the adapter rank, e.g. 8, 16 or 64)"),
    (["--lora_r", "-4"], "--lora_r -4: must be a positive integer"),
    (["--lora_alpha", "0"], "--lora_alpha 0: must be a positive number (the scale is lora_alpha / r"),
    (["--lora_dropout", "1"], "--lora_dropout 1: must be a probability in [0, 1)"),
    (["--recipe", "A_rand_B_zero"], "--recipe A_rand_B_zero: recipe 'A_rand_B_zero': nothing trains"),
    (["--target_modules", "q_proj,v_proj"], "--target_modules q_proj,v_proj: separate module names with spaces"),
    (["--target_modules", "all-linear", "q_proj"], "--target_modules all-linear q_proj: all-linear already means"),
    (["--learning_rate", "-0.001"], "--learning_rate -0.001: must be a positive number"),
    (["--max_length", "0"], "--max_length 0: must be a positive integer number of tokens"),
    (["--eval_fraction", "1.5"], "--eval_fraction 1.5: must be a fraction in [0, 1)"),
    (["--stop_after_steps", "0"], "--stop_after_steps 0: must be a positive integer step"),
])
def test_flag_values_are_refused_before_anything_loads(tiny_model_dir, tmp_path, caplog, flags, line):
    caplog.set_level(logging.INFO)
    with pytest.raises(SystemExit) as refused:
        main(["--model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *flags])
    message = str(refused.value)
    assert message.startswith(f"asymllm train: error: {line}"), message
    assert "\n" not in message
    # nothing heavy ran: neither the data nor the model was loaded, no output folder made
    assert "data:" not in caplog.text and f"model {tiny_model_dir} in" not in caplog.text, caplog.text
    assert not (tmp_path / "out").exists()


# --- item 3: the shipped example config, and unknown keys in a config


def test_example_config_parses_with_every_key_applied():
    """Parsed as `launch/sft.py --config launch/run.example.yaml` parses it (the distributed
    bootstrap first: the file asks for ZeRO-3), in a fresh process with a world of one."""
    written = yaml.safe_load(EXAMPLE.read_text())
    code = ("import json, sys; from asymllm.training.config import parse_train_args, uses_deepspeed; "
            "from asymllm.distributed import bootstrap_cpu_distributed, finish_distributed; "
            "argv = sys.argv[1:]; done, _ = bootstrap_cpu_distributed(uses_deepspeed(argv)); "
            "parsed = parse_train_args(argv, use_configured_state=done); "
            "print('PARSED', json.dumps({k: v for a in parsed for k, v in vars(a).items() if k in %r}, default=str)); "
            "finish_distributed()" % sorted(written))
    argv = ["--config", str(EXAMPLE)]
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        argv += ["--bf16", "false"]  # transformers refuses bf16 on a machine without a bf16 GPU
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(runs.free_port())}
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.split("PARSED ", 1)[1].splitlines()[0])
    expected = {k: v for k, v in written.items() if not (k == "bf16" and "--bf16" in argv)}
    assert {k: parsed[k] for k in expected} == expected
    assert written["recipe"] == "A_rand_hB_zero" and written["bf16"] is True and written["activation_checkpointing"] is True
    assert (REPO / written["deepspeed"]).is_file() and "zero3" in written["deepspeed"]
    assert written["eval_strategy"] == "steps" and written["save_strategy"] == "steps"


def test_readme_commands_use_the_shipped_config():
    readme = (REPO / "README.md").read_text()
    assert "--config run.yaml" not in readme and "[--config run.yaml]" not in readme
    assert readme.count("--config launch/run.example.yaml") >= 4


@pytest.mark.parametrize("text, line", [
    ("lora_rr: 3\n", "unknown key lora_rr (did you mean: lora_rr -> lora_r?)"),
    ("recipe: lora\nlearning_rat: 1e-4\nmax_lenght: 64\n",
     "unknown keys learning_rat, max_lenght (did you mean: learning_rat -> learning_rate, max_lenght -> max_length?)"),
])
def test_unknown_config_key_gets_did_you_mean(tmp_path, text, line):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as refused:
        parse_train_args(["--config", str(config)])
    assert str(refused.value).startswith(f"--config {config}: {line}"), str(refused.value)


# --- item 8: transformers' deprecated gradient_checkpointing name, progress bars off without a terminal


def _parse_quietly(argv):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parsed = parse_train_args(argv)
    return parsed[3], [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_default_parse_passes_no_deprecated_checkpointing_argument():
    sft_config, future = _parse_quietly([])
    assert not [m for m in future if "checkpointing" in m], future
    import torch

    assert sft_config.activation_checkpointing is torch.cuda.is_available()  # asymllm's machine default
    assert sft_config.gradient_checkpointing == sft_config.activation_checkpointing  # TRL reads the old name


@pytest.mark.parametrize("argv, expected", [
    (["--activation_checkpointing", "true"], True),
    (["--activation_checkpointing", "false"], False),
    (["--gradient_checkpointing", "true"], True),   # the old name still works (transformers says it is deprecated)
    (["--gradient_checkpointing", "false"], False),
])
def test_either_checkpointing_flag_wins_over_the_machine_default(argv, expected):
    sft_config, _ = _parse_quietly(argv)
    assert sft_config.activation_checkpointing is expected and sft_config.gradient_checkpointing is expected


def test_old_checkpointing_key_in_a_config_file_still_works(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("gradient_checkpointing: true\n")
    sft_config, _ = _parse_quietly(["--config", str(config)])
    assert sft_config.activation_checkpointing is True


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self):
        return self.tty

    def write(self, text):
        return len(text)

    def flush(self):
        pass


@pytest.mark.parametrize("tty, disabled", [(True, False), (False, True)])
def test_progress_bars_only_on_a_terminal(monkeypatch, tty, disabled):
    monkeypatch.setattr(sys, "stderr", _Stream(tty))
    sft_config, _ = _parse_quietly([])
    assert sft_config.disable_tqdm is disabled
    sft_config, _ = _parse_quietly(["--disable_tqdm", "false"])  # asked for: kept
    assert sft_config.disable_tqdm is False



def test_bf16_on_a_machine_without_it_names_the_flag_to_pass(tmp_path):
    # The example config is for GPU clusters (bf16: true); on a CPU transformers' own refusal
    # ("Your setup doesn't support bf16/gpu") names neither the flag nor the way out.
    from asymllm.training.config import ConfigError, parse_train_args

    config = tmp_path / "gpu.yaml"
    config.write_text("bf16: true\n")
    with pytest.raises(ConfigError) as refused:
        parse_train_args(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    assert str(refused.value).startswith("--bf16 true: this machine cannot train in bf16"), str(refused.value)
    assert "--bf16 false" in str(refused.value)


def test_a_single_module_name_in_a_config_file_is_a_list_of_one(tmp_path):
    # YAML `target_modules: q_proj` is a string, which peft would take as a regex over full
    # module names ("q_proj" matches none of "model.layers.0.self_attn.q_proj"): the run would
    # fail only after the model loaded. A bare module name means that module.
    from asymllm.training.config import check_run_flags, parse_train_args

    config = tmp_path / "run.yaml"
    for value, expected in (("q_proj", ["q_proj"]), ("all-linear", "all-linear"), ("'.*\\.q_proj'", ".*\\.q_proj")):
        config.write_text(f"target_modules: {value}\n")
        adapter_args, _, data_args, sft_config = parse_train_args(["--config", str(config), "--output_dir", str(tmp_path / "o")])
        check_run_flags(adapter_args, data_args, sft_config)
        assert adapter_args.target_modules == expected, value
