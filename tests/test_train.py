"""`asymllm train` in one process on a tiny local model: what a run leaves and what it refuses."""

import contextlib
import io
import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from asymllm import LoRASYMConfig, get_lorasym_model, load_lorasym_model, lora_layers, verify_adapter_dir
from asymllm.training.config import AdapterArguments
from asymllm.tiny import save_tiny_model
from asymllm.training.train import main
from transformers import AutoModelForCausalLM

README = Path(__file__).resolve().parent.parent / "README.md"
SEED = 1234
COMMON = ["--max_steps", "6", "--logging_steps", "2", "--save_strategy", "steps", "--save_steps", "3",
          "--seed", str(SEED), "--per_device_eval_batch_size", "64"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "out"
    result = main(["--model", tiny_model_dir, "--output_dir", str(output_dir), *COMMON])
    return result, output_dir


def test_frozen_A_unchanged_and_B_trained(run, tiny_model_dir):
    result, output_dir = run
    reference = get_lorasym_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                  LoRASYMConfig(recipe="A_rand_hB_zero", r=16, lora_alpha=32, seed=SEED))
    saved = load_file(output_dir / "adapter" / "adapter_model.safetensors")
    for name, layer in lora_layers(reference):
        assert torch.equal(saved[f"{name}.lora_A.weight"], layer.lora_A["default"].weight), name
        assert saved[f"{name}.lora_B.weight"].abs().sum() > 0, name


def test_adapter_and_checkpoints_complete_and_reload_identical(run, tiny_model_dir):
    _, output_dir = run
    for folder in ("adapter", "checkpoint-3", "checkpoint-6"):
        assert len(verify_adapter_dir(str(output_dir / folder))) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    model = load_lorasym_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(output_dir / "adapter"), is_trainable=True)
    saved = load_file(output_dir / "adapter" / "adapter_model.safetensors")
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, saved[name.replace(".default.", ".")])
            assert param.requires_grad == ("lora_B" in name)


def test_run_record_metrics_and_loss_curve(run):
    result, output_dir = run
    record = json.loads((output_dir / "asymllm_run.json").read_text())
    assert record["recipe"] == "A_rand_hB_zero" and record["seed"] == SEED
    assert record["sft_config"]["max_steps"] == 6 and record["adapter"]["lora_r"] == 16
    assert record["adapter_path"].startswith("adapter path: fused frozen A") and "on all 14 adapted layers" in record["adapter_path"]
    assert record["versions"]["torch"] and record["versions"]["trl"]
    assert "git_commit" in record
    assert (output_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["eval_loss"] > 0  # built-in data brings its held-out part
    assert result["last_logged_loss"] < result["first_logged_loss"]


def test_logs_carry_throughput_and_true_trainable_count(run):
    _, output_dir = run
    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert len(logged) == 3
    expected = 16 * (64 + 32 + 32 + 64 + 128 + 128 + 64) * 2  # r * d_out over q,k,v,o,gate,up,down, 2 layers
    assert all(h["trainable_params"] == expected for h in logged)
    assert all(h["loss_tokens_per_s"] > 0 for h in logged)


def test_yaml_config_with_flags_winning(tiny_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\nrecipe: lora\nlora_r: 4\nmax_steps: 2\nlogging_steps: 1\nsave_strategy: 'no'\n")
    result = main(["--config", str(config), "--lora_r", "2", "--output_dir", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out" / "asymllm_run.json").read_text())
    assert record["recipe"] == "hA_he_hB_zero" and record["adapter"]["lora_r"] == 2 and result["steps"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--recipe", "A_rnd_hB_zero"], "unknown init 'rnd' for A; choices: V, rand, he, zero; did you mean 'rand'"),
    (["--recipe", "A_rand_B_zero"], "nothing trains"),
    (["--model", "/no/such/model"], "--model /no/such/model: no such folder"),
    (["--dataset", "/no/such/data.jsonl"], "/no/such/data.jsonl"),
    (["--lora_rr", "3"], "did you mean: --lora_rr -> --lora_r"),
    (["--config", "/no/such.yaml"], "--config /no/such.yaml: no such file"),
    (["--resume_from_checkpoint", "/no/such/checkpoint"], "--resume_from_checkpoint /no/such/checkpoint: no such checkpoint folder"),
    (["--packing", "true", "--packing_strategy", "wrapped"], "packing"),
])
def test_user_mistakes_are_one_clear_line(tiny_model_dir, tmp_path, capsys, flags, message):
    """In this process (an `asymllm train` process costs 7 s of imports here); the one-line exit
    of the real command is the next test's."""
    args = ["--model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *flags]
    if "--model" in flags:
        args = args[2:]
    with pytest.raises(SystemExit) as exited:  # any other exception would be a traceback for the user
        main(args)
    said = (exited.value.code if isinstance(exited.value.code, str) else "") + capsys.readouterr().err
    assert exited.value.code not in (0, None)
    assert message in said, said[-2000:]


def test_a_user_mistake_ends_the_real_command_with_one_line_and_no_traceback(tiny_model_dir, tmp_path):
    args = ["--model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--recipe", "A_rnd_hB_zero"]
    done = subprocess.run([sys.executable, "-m", "asymllm.cli", "train", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("asymllm train: error: ")]
    assert len(errors) == 1 and "unknown init 'rnd' for A" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_report_to_tensorboard_passes_through(tiny_model_dir, tmp_path):
    main(["--model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--logging_steps", "1",
          "--save_strategy", "no", "--report_to", "tensorboard"])
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


# --- one folder per run: a second seed or a rerun never writes over a finished run (issue 10, item 2)

ONE_STEP = ["--max_steps", "1", "--logging_steps", "1", "--save_strategy", "no"]


def _frozen_A(adapter_dir) -> dict:
    return {k: v for k, v in load_file(adapter_dir / "adapter_model.safetensors").items() if ".lora_A." in k}


def test_default_output_dir_is_per_seed_and_a_used_one_is_refused(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    for seed in (1, 2):
        main(["--model", tiny_model_dir, "--seed", str(seed), *ONE_STEP])
    first, second = (_frozen_A(tmp_path / "outputs" / f"A_rand_hB_zero-r16-s{seed}" / "adapter") for seed in (1, 2))
    assert sorted(first) == sorted(second) and not any(torch.equal(first[k], second[k]) for k in first)
    caplog.clear()
    with pytest.raises(SystemExit) as refused:
        main(["--model", tiny_model_dir, "--seed", "1", *ONE_STEP])
    message = str(refused.value)
    assert "outputs/A_rand_hB_zero-r16-s1" in message and "adapter/" in message, message
    assert "--overwrite_output_dir" in message and "--resume_from_checkpoint" in message, message
    assert f"model {tiny_model_dir} in" not in caplog.text  # refused before the model was loaded
    assert torch.equal(_frozen_A(tmp_path / "outputs" / "A_rand_hB_zero-r16-s1" / "adapter")[next(iter(first))],
                       first[next(iter(first))])


def test_overwrite_output_dir_starts_afresh_without_stale_checkpoints(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-9").mkdir(parents=True)  # left by an earlier, longer run
    with pytest.raises(SystemExit, match=r"checkpoint-9.*--overwrite_output_dir"):
        main(["--model", tiny_model_dir, "--output_dir", str(out), *ONE_STEP])
    main(["--model", tiny_model_dir, "--output_dir", str(out), "--overwrite_output_dir", *ONE_STEP])
    # a stale checkpoint-9 would be taken by a later `--resume_from_checkpoint auto`, and the
    # Trainer's save_total_limit rotation would delete the new run's checkpoints before it
    assert not (out / "checkpoint-9").exists() and (out / "adapter" / "adapter_model.safetensors").exists()


# --- one set of adapter defaults (issue 10, item 13)


def test_python_api_cli_and_readme_share_one_set_of_adapter_defaults():
    api, cli = LoRASYMConfig(), AdapterArguments()
    assert (api.r, api.lora_alpha, api.lora_dropout) == (cli.lora_r, cli.lora_alpha, cli.lora_dropout)
    row = next(line for line in (README.parent / "docs" / "training.md").read_text().splitlines()
               if line.startswith("| `--lora_r`, `--lora_alpha`"))
    documented = [float(value) for value in row.split("|")[2].split(",")]
    assert documented == [16, 32, 0] == [api.r, api.lora_alpha, api.lora_dropout]


# --- issue 15: a run shorter than the logging interval, the run's model card, what a log file shows


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def short_run(tiny_model_dir, tmp_path_factory):
    """`--max_steps 3`, fewer than the logging interval, saving a checkpoint (TRL writes its
    model card there); stdout, log lines and FutureWarnings kept."""
    output_dir = tmp_path_factory.mktemp("short") / "out"
    records, stdout = _Records(), io.StringIO()
    package_logger = logging.getLogger("asymllm")
    package_logger.addHandler(records)
    level, package_logger.level = package_logger.level, logging.INFO  # as `asymllm train`'s own logging setup has it
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
            warnings.simplefilter("always")
            main(["--model", tiny_model_dir, "--output_dir", str(output_dir), "--max_steps", "3", "--logging_steps", "5",
                  "--save_strategy", "steps", "--save_steps", "3", "--seed", str(SEED)])
    finally:
        package_logger.removeHandler(records)
        package_logger.setLevel(level)
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    return output_dir, stdout.getvalue(), records.lines, future


def test_short_run_logs_its_last_step_and_names_only_files_that_exist(short_run):
    output_dir, stdout, _, _ = short_run
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [3]
    assert re.search(r"^done: 3 steps; train loss \d+\.\d{4} \(first log\) -> \d+\.\d{4} \(last log\)$", stdout, re.M), stdout
    named = re.findall(r"^(?:adapter|loss curve|model card|run record): +(\S+)", stdout, re.M)
    assert len(named) == 4 and all(Path(p).exists() for p in named), (named, stdout)
    assert (output_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_does_not_name_a_loss_curve_it_did_not_draw(tiny_model_dir, tmp_path, capsys):
    main(["--model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
          "--logging_strategy", "no", "--save_strategy", "no"])
    out = capsys.readouterr().out
    assert not (tmp_path / "out" / "loss_curve.png").exists() and "loss curve:" not in out, out
    assert re.search(r"^done: 1 steps; train loss \d+\.\d{4} \(mean\)$", out, re.M), out


def test_run_model_card_names_the_real_base_recipe_rank_and_data(short_run, tiny_model_dir):
    output_dir = short_run[0]
    card = (output_dir / "README.md").read_text()
    assert "None" not in card, card
    assert f"| base model | {tiny_model_dir} |" in card
    assert "| recipe | A_rand_hB_zero: A init=rand frozen, B init=zero trained, seed 1234 |" in card
    assert "| rank r | 16 |" in card and "| lora_alpha | 32.0 |" in card
    assert "| target modules | down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj |" in card
    assert "- data: asymllm built-in instruction data (split train); held out: built-in held-out set" in card
    assert f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{tiny_model_dir}"), "{output_dir}/adapter")' in card
    assert "## Results" in card and "steps 3" in card  # rewritten at the end, with metrics.json
    assert f"vllm serve {tiny_model_dir} --enable-lora --lora-modules out={output_dir}/adapter --max-lora-rank 16" in card


def test_a_trainer_used_outside_asymllm_train_writes_no_card_naming_none(tiny_model_dir, tmp_path):
    from asymllm.training.report import write_run_card

    assert write_run_card(str(tmp_path)) is None and not (tmp_path / "README.md").exists()


def test_train_passes_no_deprecated_checkpointing_argument(short_run):
    # transformers' TrainingArguments warning; peft 0.21's own read of the deprecated
    # `is_gradient_checkpointing` property (in PeftModel.__init__) is peft's to change
    future = short_run[3]
    assert not [m for m in future if m.startswith("`gradient_checkpointing` is deprecated")], future


def test_without_a_terminal_progress_is_plain_lines(short_run):
    _, stdout, lines, _ = short_run
    progress = [line for line in lines if line.startswith("step ")]
    assert progress and re.match(r"step 3/3 \(100%\) \| loss \d", progress[0]), progress
    assert re.search(r"\| elapsed \d+:\d\d:\d\d$", progress[0]) and "loss_tokens_per_s" in progress[0], progress[0]
    assert "{'loss'" not in stdout  # PrinterCallback's raw dicts are replaced, not doubled


# --- issue 15 item 4: --target_modules all-linear


def test_all_linear_from_the_command_line_is_resolved_logged_and_resumable(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    flags = ["--model", tiny_model_dir, "--output_dir", str(out), "--target_modules", "all-linear", "--max_steps", "2",
             "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1"]
    assert main([*flags, "--stop_after_steps", "1"])["stopped_at"] == 1
    every_linear = "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"  # of the blocks; lm_head never
    assert f"target modules (all-linear): {every_linear}" in caplog.text
    config = json.loads((out / "checkpoint-1" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == every_linear.split(", ")
    assert main([*flags, "--resume_from_checkpoint", "auto"])["steps"] == 2  # the resume check sees the resolved list


class _ReachedTrainability(Exception):
    pass


def test_the_recipe_is_parsed_once_on_its_way_to_the_adapter(tiny_model_dir, tmp_path, monkeypatch):
    """`--recipe NAME` becomes a Recipe at the entry point; everything downstream gets that
    object (the count is taken when set_recipe_trainability is reached, then the run stops)."""
    import asymllm.adapters.model as model_module
    from asymllm.adapters.recipe import Recipe

    calls, parse = [], Recipe.parse.__func__
    monkeypatch.setattr(Recipe, "parse", classmethod(lambda cls, name: calls.append(name) or parse(cls, name)))

    def reached(model, recipe, adapter_name="default"):
        raise _ReachedTrainability(list(calls), recipe)

    monkeypatch.setattr(model_module, "set_recipe_trainability", reached)
    with pytest.raises(_ReachedTrainability) as stop:
        main(["--model", tiny_model_dir, "--output_dir", str(tmp_path / "out"), "--recipe", "b_only", "--max_steps", "1"])
    parsed, recipe = stop.value.args
    assert parsed == ["b_only"]
    assert isinstance(recipe, Recipe) and recipe.name == "A_rand_hB_zero"
