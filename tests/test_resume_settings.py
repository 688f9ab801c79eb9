"""A checkpoint is continued only under the settings it was made with (issue "Numbers users can
trust, round 2", finding 2).

A run stopped after step 2 and resumed with another --max_steps, learning rate, schedule, batch,
max length, packing, dataset (or the same data file edited), ... would continue the old
optimizer, scheduler and data position while its run record states the new settings. Each
checkpoint carries the settings that shaped it (in its completion marker, from the run record),
and `asymllm train` refuses a resume under any other, with exit code 4 and one stderr line
naming each setting, the checkpoint's value and this run's. Settings that do not shape training
(logging, saving, evaluation batch, the output folder, fault handling) never block a resume.
A checkpoint from before these settings existed resumes with a warning that they went unchecked.

Every run here is a real `asymllm train` on asymllm.tiny's model, in this process (a refusal
comes before the model loads: seconds) and once through the installed `asymllm` command.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist"))

import sft_runs as runs  # noqa: E402
from asymllm.data import BUILTIN_DATASET  # noqa: E402
from asymllm.training.train import main  # noqa: E402

STALE = 4  # the exit code the sweep restarts a cell afresh on (asymllm.training.checkpoints.EXIT_STALE_CHECKPOINT)
MARKER = "asymllm_checkpoint.json"
RESUME = ["--resume_from_checkpoint", "auto"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return runs.tiny_model_dir(tmp_path_factory)


def _data_file(folder, lines: int = 64) -> str:
    """A local copy of part of the built-in data: a file whose content a test may change."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "data.jsonl")
    with open(BUILTIN_DATASET) as f, open(path, "w") as out:
        out.writelines(f.readlines()[:lines])
    return path


def _flags(model_dir, data, out) -> list[str]:
    return ["--model", model_dir, "--dataset", data, "--output_dir", str(out), "--max_steps", "4",
            "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1", "--eval_strategy", "no",
            "--seed", "7", "--per_device_train_batch_size", "4", "--lora_r", "4", "--lora_alpha", "8"]


def _with(flags: list[str], *changes: str) -> list[str]:
    """`flags` with each `--name value` of changes replacing its flag's value, or added."""
    flags = list(flags)
    for name, value in zip(changes[::2], changes[1::2]):
        if name in flags:
            flags[flags.index(name) + 1] = value
        else:
            flags += [name, value]
    return flags


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, model_dir):
    """A run stopped after step 2 (checkpoint-1 and checkpoint-2 complete), as an interruption leaves it."""
    root = tmp_path_factory.mktemp("stopped")
    data = _data_file(root / "data")
    out = root / "out"
    assert main([*_flags(model_dir, data, out), "--stop_after_steps", "2"])["stopped_at"] == 2
    return {"out": out, "data": data}


def _interrupted_copy(stopped, tmp_path):
    """The stopped run's folder, copied: a resume (or a refusal that went wrong) must not change the shared one."""
    out = tmp_path / "out"
    shutil.copytree(stopped["out"], out)
    return out


def _refused_as_stale(argv, capsys) -> str:
    """Run `asymllm train` here; it must exit 4 with one `asymllm train: error: --resume_from_checkpoint` line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == STALE, f"exit {stopped.value.code!r}, not {STALE}; stderr: {err[-2000:]}"
    lines = [line for line in err.splitlines() if line.startswith("asymllm train: error:")]
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("asymllm train: error: --resume_from_checkpoint "), lines[0]
    return lines[0]


@pytest.mark.parametrize("changes, shown", [
    (("--max_steps", "8"), ["--max_steps: 4 in the checkpoint, 8 in this run"]),
    (("--learning_rate", "5e-4"), ["--learning_rate: 0.001 in the checkpoint, 0.0005 in this run"]),
    (("--lr_scheduler_type", "linear"), ["--lr_scheduler_type: cosine in the checkpoint, linear in this run"]),
    (("--warmup_steps", "0"), ["--warmup_steps: 5 in the checkpoint, 0 in this run"]),
    (("--weight_decay", "0.1"), ["--weight_decay: 0 in the checkpoint, 0.1 in this run"]),
    (("--optim", "adamw_torch"), ["--optim: adamw_torch_fused in the checkpoint, adamw_torch in this run"]),
    (("--per_device_train_batch_size", "2"), ["--per_device_train_batch_size: 4 in the checkpoint, 2 in this run"]),
    (("--gradient_accumulation_steps", "2"), ["--gradient_accumulation_steps: 1 in the checkpoint, 2 in this run"]),
    (("--max_length", "64"), ["--max_length: 512 in the checkpoint, 64 in this run"]),
    (("--packing", "true"), ["--packing: False in the checkpoint, True in this run"]),
    (("--num_train_epochs", "3"), ["--num_train_epochs: 2 in the checkpoint, 3 in this run"]),
    (("--eval_fraction", "0.25"), ["--eval_fraction: 0 in the checkpoint, 0.25 in this run"]),
    (("--data_seed", "3"), ["--data_seed: None in the checkpoint, 3 in this run"]),
    (("--lora_dropout", "0.1"), ["--lora_dropout: 0 in the checkpoint, 0.1 in this run"]),
    (("--train_on_inputs", "true"), ["--train_on_inputs: False in the checkpoint, True in this run"]),
    (("--chat_template", "alpaca"), ["--chat_template: None in the checkpoint, "]),
    (("--max_steps", "8", "--learning_rate", "5e-4"),  # every difference, in one line
     ["--max_steps: 4 in the checkpoint, 8 in this run", "--learning_rate: 0.001 in the checkpoint, 0.0005 in this run"]),
])
def test_resume_under_a_changed_training_setting_is_refused_naming_it(stopped, model_dir, tmp_path, capsys, caplog, changes, shown):
    out = _interrupted_copy(stopped, tmp_path)
    caplog.set_level(logging.INFO)
    line = _refused_as_stale(_with(_flags(model_dir, stopped["data"], out), *changes) + RESUME, capsys)
    assert line.startswith(f"asymllm train: error: --resume_from_checkpoint {out / 'checkpoint-2'}: made with other settings"), line
    for fragment in shown:
        assert fragment in line, line
    assert f"model {model_dir} in" not in caplog.text  # refused before the model loaded
    assert not (out / "adapter").exists() and not (out / "checkpoint-3").exists()


def test_resume_with_another_data_file_or_the_same_file_edited_is_refused(model_dir, tmp_path, capsys):
    data = _data_file(tmp_path / "data")
    out = tmp_path / "out"
    flags = _flags(model_dir, data, out)
    main([*flags, "--stop_after_steps", "2"])
    other = _data_file(tmp_path / "other", lines=48)
    line = _refused_as_stale(_with(flags, "--dataset", other) + RESUME, capsys)
    assert f"--dataset: {os.path.realpath(data)} (sha256 " in line and f"in the checkpoint, {os.path.realpath(other)} (sha256 " in line, line
    with open(data, "a") as f:  # the same path, one more example: other training data
        f.write(json.dumps({"instruction": "Say yes.", "input": "", "output": "yes"}) + "\n")
    line = _refused_as_stale(flags + RESUME, capsys)
    assert f"--dataset: {os.path.realpath(data)} (sha256 " in line and "in this run" in line, line
    assert not (out / "adapter").exists()


def test_asymllm_train_refuses_the_issue_s_repro_with_exit_4_and_one_stderr_line(model_dir, tmp_path):
    """The issue's commands, the second through the installed `asymllm` entry point: stopped at 4
    of 40 steps, resumed with --max_steps 8."""
    out = tmp_path / "d"
    common = ["--model", model_dir, "--recipe", "lora", "--lora_r", "4", "--lora_alpha", "8", "--seed", "0",
              "--output_dir", str(out), "--save_steps", "2"]
    assert main([*common, "--max_steps", "40", "--stop_after_steps", "4"])["stopped_at"] == 4
    command = [os.path.join(os.path.dirname(sys.executable), "asymllm"), "train", *common, "--max_steps", "8", *RESUME]
    done = subprocess.run(command, env=runs.base_env(), capture_output=True, text=True, timeout=runs.TIMEOUT_S)
    assert done.returncode == STALE, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("asymllm train: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith(f"asymllm train: error: --resume_from_checkpoint {out / 'checkpoint-4'}: "), errors[0]
    assert "--max_steps: 40 in the checkpoint, 8 in this run" in errors[0], errors[0]
    assert "Traceback" not in done.stderr and not (out / "adapter").exists()
    from asymllm.training.checkpoints import EXIT_STALE_CHECKPOINT  # the constant the sweep imports

    assert EXIT_STALE_CHECKPOINT == STALE


def test_settings_that_do_not_shape_training_never_block_a_resume(stopped, model_dir, tmp_path, caplog):
    """Another logging or saving interval, evaluation batch, output folder, progress display,
    fault handling, and no --stop_after_steps: the resume continues and ends the run."""
    checkpoint = stopped["out"] / "checkpoint-2"
    other_dir = tmp_path / "elsewhere"  # an explicit checkpoint continued into another --output_dir
    flags = _with(_flags(model_dir, stopped["data"], other_dir), "--logging_steps", "3", "--save_steps", "2",
                  "--save_total_limit", "1", "--per_device_eval_batch_size", "3", "--disable_tqdm", "true",
                  "--report_to", "none", "--max_bad_steps", "1", "--dataloader_pin_memory", "false")
    caplog.set_level(logging.INFO)
    result = main([*flags, "--resume_from_checkpoint", str(checkpoint)])
    assert result["steps"] == 4
    assert runs.RESTORED.search(caplog.text) is not None
    assert "could not be checked" not in caplog.text


def test_every_checkpoint_carries_the_settings_it_was_made_with(stopped):
    record = json.loads((stopped["out"] / "asymllm_run.json").read_text())
    settings = record["training_settings"]
    for name in ("checkpoint-1", "checkpoint-2"):
        marker = json.loads((stopped["out"] / name / MARKER).read_text())
        assert marker["training_settings"] == settings, name
    with open(stopped["data"], "rb") as f:
        assert settings["--dataset"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert settings["--max_steps"] == 4 and settings["--learning_rate"] == 1e-3 and settings["world size"] == 1
    assert settings["--recipe"] == "A_rand_hB_zero" and settings["--model"]["sha256"]
    for ignored in ("--logging_steps", "--save_steps", "--output_dir", "--stop_after_steps", "--max_bad_steps", "--report_to"):
        assert ignored not in settings


def test_a_checkpoint_without_recorded_settings_resumes_with_a_warning(stopped, model_dir, tmp_path, caplog):
    """Made by an asymllm from before the settings were recorded: its settings cannot be checked."""
    out = _interrupted_copy(stopped, tmp_path)
    marker_path = out / "checkpoint-2" / MARKER
    marker = json.loads(marker_path.read_text())
    marker.pop("training_settings", None)
    marker_path.write_text(json.dumps(marker))
    caplog.set_level(logging.INFO)
    assert main(_flags(model_dir, stopped["data"], out) + RESUME)["steps"] == 4
    assert (f"--resume_from_checkpoint {out / 'checkpoint-2'}: the checkpoint records no training settings (made by an "
            "earlier asymllm), so they could not be checked") in caplog.text


def test_every_flag_is_either_compared_on_resume_or_deliberately_ignored():
    """A new flag (from asymllm or TRL/transformers) must be classed: shapes training, or not."""
    from asymllm.run_record import COMPARED_FLAGS, IGNORED_FLAGS
    from asymllm.training.config import AdapterArguments, DataArguments, ModelArguments, RunConfig

    every = {f.name for dc in (AdapterArguments, ModelArguments, DataArguments, RunConfig) for f in dataclasses.fields(dc) if f.init}
    assert not set(COMPARED_FLAGS) & set(IGNORED_FLAGS), set(COMPARED_FLAGS) & set(IGNORED_FLAGS)
    assert every - set(COMPARED_FLAGS) - set(IGNORED_FLAGS) == set(), "unclassified flags"
    for must_not_block in ("logging_steps", "save_steps", "save_total_limit", "output_dir", "report_to", "disable_tqdm",
                           "stop_after_steps", "per_device_eval_batch_size", "dataloader_num_workers", "max_bad_steps"):
        assert must_not_block in IGNORED_FLAGS
