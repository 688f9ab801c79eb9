"""Resume: a run stopped after step 4 and resumed ends with the same adapter as one never
stopped (max abs diff <= 1e-6, the frozen A bit-identical), in one process and under
2-rank ZeRO-3, with a non-default seed (1234).

Each interrupted run is the *same command twice*, `--resume_from_checkpoint auto` included:
the first time (with `--stop_after_steps 4`) the output folder is empty, so `auto` must
say so and start from scratch; the second time it must continue from checkpoint-4.

The ZeRO-3 trap (docs/design.md, trap 12): the DeepSpeed checkpoint the Trainer writes leaves
frozen parameters out (checked below on the files), so a frozen A comes back only because
asymllm restores it. That is checked with an A that differs from the checkpoint's once the
Trainer has loaded it (tests/dist/sft_probe.py perturbs it at train begin): the resumed run
must still end with the checkpoint's A and the uninterrupted run's adapter. A rand A that
rebuilding from the seed does NOT reproduce (perturbed right after the build) is refused,
on every rank.

The multi-process drills are marked slow (about 3 minutes alone on a shared 2-core machine,
less after tests/test_train_distributed.py, whose uninterrupted runs they reuse). The
checks at the end (a checkpoint made with other settings, a frozen factor that does not
rebuild) run in this process in seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist"))

import sft_runs as runs  # noqa: E402
from asymllm import verify_adapter_dir  # noqa: E402
from asymllm.training.checkpoints import write_marker  # noqa: E402
from asymllm.training.train import main  # noqa: E402

slow = pytest.mark.slow  # the multi-process drills; the checks at the end run in this process, in seconds

RESUME = ("--resume_from_checkpoint", "auto")
STOP = ("--stop_after_steps", str(runs.SAVE_STEPS))
PERTURBATION = 1e-2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return runs.tiny_model_dir(tmp_path_factory)


def _stop_then_resume(out, make_commands, env=None, keep_copy=None):
    """Run the stopped half, optionally copy the folder as the interruption left it, resume."""
    stopped = runs.launch(make_commands(STOP), out.parent, env=env, what="stopped run")
    if keep_copy is not None:
        shutil.copytree(out, keep_copy)
    resumed = runs.launch(make_commands(()), out.parent, env=env, what="resumed run")
    return {"output_dir": out, "stopped": stopped, "resumed": resumed, "copy": keep_copy}


@pytest.fixture(scope="module")
def single(tmp_path_factory, model_dir):
    out = tmp_path_factory.mktemp("resume_single") / "out"
    batch = ("--per_device_train_batch_size", str(runs.GLOBAL_BATCH))
    return _stop_then_resume(out, lambda stop: [runs.single_command(out, model_dir, *batch, *RESUME, *stop)])


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, model_dir):
    out = tmp_path_factory.mktemp("resume_zero3") / "out"
    args = ("--per_device_train_batch_size", str(runs.GLOBAL_BATCH // 2), "--deepspeed", runs.zero3_config(tmp_path_factory))
    return _stop_then_resume(out, lambda stop: [runs.torchrun_command(out, model_dir, *args, *RESUME, *stop)],
                             keep_copy=out.parent / "as_interrupted")


def _resume_perturbed(tmp_path_factory, zero3, model_dir, when: str, expect_ok: bool) -> dict:
    """Resume a copy of the ZeRO-3 run, as interrupted, with its frozen A perturbed `when`."""
    out = tmp_path_factory.mktemp(f"perturbed_{when}") / "out"
    shutil.copytree(zero3["copy"], out)
    args = ("--per_device_train_batch_size", str(runs.GLOBAL_BATCH // 2), "--deepspeed", runs.zero3_config(tmp_path_factory))
    result = runs.launch([runs.torchrun_command(out, model_dir, *args, *RESUME, script=runs.PROBE)], out.parent,
                         env=runs.base_env(ASYMLLM_PERTURB_FROZEN=PERTURBATION, ASYMLLM_PERTURB_FROZEN_AT=when),
                         expect_ok=expect_ok, what=f"resume A perturbed at {when}")
    return {"output_dir": out, "resumed": result}


@pytest.fixture(scope="module")
def zero3_unrebuildable_A(tmp_path_factory, zero3, model_dir):
    return _resume_perturbed(tmp_path_factory, zero3, model_dir, "build", expect_ok=False)


@pytest.fixture(scope="module")
def zero3_A_changed_after_load(tmp_path_factory, zero3, model_dir):
    return _resume_perturbed(tmp_path_factory, zero3, model_dir, "train_begin", expect_ok=True)


@pytest.fixture(scope="module")
def uninterrupted_single(tmp_path_factory):
    return runs.uninterrupted_single(tmp_path_factory)


@pytest.fixture(scope="module")
def uninterrupted_zero3(tmp_path_factory):
    return runs.uninterrupted_zero3(tmp_path_factory)


def _assert_same_adapter(resumed_dir, reference_dir, what):
    verify_adapter_dir(str(resumed_dir))
    resumed, reference = runs.adapter_tensors(resumed_dir), runs.adapter_tensors(reference_dir)
    diff = runs.max_abs_diff(resumed, reference)
    assert diff <= 1e-6, f"{what}: resumed vs uninterrupted adapter, max abs diff {diff:.3g}"
    for key in runs.factor_keys(reference, "lora_A"):
        assert torch.equal(resumed[key], reference[key]), f"{what}: frozen {key} changed across the resume"
    for key in runs.factor_keys(reference, "lora_B"):
        assert torch.count_nonzero(resumed[key]) > 0, f"{what}: {key} never trained"
    return diff


def _restored(log: str) -> tuple[int, str, float]:
    matches = runs.RESTORED.findall(log)
    assert len(matches) == 1, f"expected one 'frozen factor tensors restored' line, found {matches}:\n{log[-4000:]}"
    count, source, worst = matches[0]
    return int(count), source, float(worst)


@slow
def test_auto_without_a_checkpoint_says_so_and_starts(single, zero3):
    for run in (single, zero3):
        out, log = run["output_dir"], run["stopped"].log
        assert f"resume auto: no checkpoint in {out}; starting from scratch" in log
        assert f"stopped at step {runs.SAVE_STEPS} as asked (--stop_after_steps)" in log
        assert runs.RESTORED.search(log) is None
    interrupted = zero3["copy"]   # what the stopped run left: checkpoint-4, no final adapter
    assert sorted(p.name for p in interrupted.iterdir() if p.is_dir()) == ["checkpoint-4"]
    assert not (interrupted / "metrics.json").exists()


@slow
def test_single_process_resume_equals_uninterrupted(single, uninterrupted_single):
    out = single["output_dir"]
    log = single["resumed"].log
    assert f"resume auto: continuing from {out / 'checkpoint-4'}" in log
    assert _restored(log) == (runs.N_TENSORS // 2, str(out / "checkpoint-4"), 0.0)
    assert f"done: {runs.MAX_STEPS} steps" in log
    record = runs.run_record(out)  # the resume keeps the first part's invocation
    assert record["resumed_from"] == str(out / "checkpoint-4")
    (first,) = record["earlier_invocations"]
    assert "--stop_after_steps" in first["command"] and "--stop_after_steps" not in record["command"]
    _assert_same_adapter(out / "adapter", uninterrupted_single.output_dir / "adapter", "1 process")
    _assert_same_adapter(out / "checkpoint-8", uninterrupted_single.output_dir / "checkpoint-8", "1 process, checkpoint-8")


@slow
def test_zero3_resume_equals_uninterrupted(zero3, uninterrupted_zero3):
    out = zero3["output_dir"]
    log = zero3["resumed"].log
    assert f"resume auto: continuing from {out / 'checkpoint-4'}" in log
    # A was rebuilt from the recorded seed identically (difference 0), then set from the file.
    assert _restored(log) == (runs.N_TENSORS // 2, str(out / "checkpoint-4"), 0.0)
    _assert_same_adapter(out / "adapter", uninterrupted_zero3.output_dir / "adapter", "ZeRO-3, 2 ranks")
    _assert_same_adapter(out / "checkpoint-8", uninterrupted_zero3.output_dir / "checkpoint-8", "ZeRO-3, checkpoint-8")


@slow
def test_zero3_deepspeed_checkpoint_leaves_frozen_A_out(zero3):
    """The trap itself, on the files: only the adapter file of checkpoint-4 holds A."""
    checkpoint = zero3["copy"] / "checkpoint-4"
    for states in runs.deepspeed_model_states(checkpoint):
        keys = list(states["module"])
        assert keys and all(".lora_B." in k for k in keys), keys
        assert not states.get("frozen_param_shapes")
    assert len(runs.factor_keys(runs.adapter_tensors(checkpoint), "lora_A")) == runs.N_TENSORS // 2


@slow
def test_zero3_resume_restores_a_frozen_A_changed_after_the_trainer_loaded_the_checkpoint(zero3_A_changed_after_load,
                                                                                          uninterrupted_zero3):
    out, log = zero3_A_changed_after_load["output_dir"], zero3_A_changed_after_load["resumed"].log
    assert f"perturbed {runs.N_TENSORS // 2} frozen factor tensors by N(0, {PERTURBATION}^2) at train begin" in log
    # measured before the Trainer loaded anything: the rebuild from the seed is exact
    assert _restored(log) == (runs.N_TENSORS // 2, str(out / "checkpoint-4"), 0.0)
    _assert_same_adapter(out / "adapter", uninterrupted_zero3.output_dir / "adapter", "ZeRO-3, A changed after load")


@slow
def test_zero3_resume_refuses_a_frozen_rand_A_the_seed_does_not_rebuild(zero3_unrebuildable_A):
    out, result = zero3_unrebuildable_A["output_dir"], zero3_unrebuildable_A["resumed"]
    assert f"perturbed {runs.N_TENSORS // 2} frozen factor tensors" in result.log
    assert result.returncodes[0] != 0
    refusal = f"asymllm train: error: --resume_from_checkpoint {out / 'checkpoint-4'}: the frozen A of model.layers."
    assert result.log.count(refusal) == 2, result.log[-4000:]  # both ranks stop, neither waits in a collective
    assert runs.RESTORED.search(result.log) is None and not (out / "adapter").exists()


@slow
def test_resume_from_a_missing_path_is_a_clear_error(tmp_path, model_dir):
    missing = tmp_path / "no-such-checkpoint"
    result = runs.launch([runs.single_command(tmp_path / "out", model_dir, "--resume_from_checkpoint", str(missing))],
                         tmp_path, expect_ok=False, what="missing checkpoint")
    assert result.returncodes[0] != 0
    assert f"--resume_from_checkpoint {missing}: no such checkpoint folder" in result.log
    assert "Traceback" not in result.log
    assert not (tmp_path / "out" / "adapter").exists()


# --- in this process, in seconds: a resume continues the run it names, or is refused (issue 10, item 6)

FAST = ["--max_steps", "2", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
        "--eval_strategy", "no", "--seed", str(runs.SEED)]
CHANGE = 1e-3


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory, model_dir):
    out = tmp_path_factory.mktemp("fast_resume") / "out"
    main(["--model", model_dir, "--output_dir", str(out), *FAST])
    return out


def _copy_checkpoint(run_dir, tmp_path):
    """checkpoint-1 of run_dir alone in a fresh output folder (a failed refusal must not touch the shared run)."""
    target = tmp_path / "out" / "checkpoint-1"
    shutil.copytree(run_dir / "checkpoint-1", target)
    return target


def _save_adapter_file(checkpoint, tensors) -> None:
    """Replace a checkpoint's adapter file as if its save had written these values: its
    completion marker is written again (else it is refused as damaged before any check here)."""
    save_file(tensors, os.path.join(checkpoint, "adapter_model.safetensors"), metadata={"format": "pt"})
    write_marker(str(checkpoint), int(str(checkpoint).rsplit("-", 1)[1]))


def _change_one_A(checkpoint, by: float):
    """Add `by` to one frozen A in the checkpoint's adapter file: what rebuilding it will not reproduce."""
    tensors = runs.adapter_tensors(checkpoint)
    key = runs.factor_keys(tensors, "lora_A")[0]
    tensors[key] = tensors[key] + by
    _save_adapter_file(checkpoint, tensors)
    return key, tensors[key]


def _resume(model_dir, checkpoint, *flags):
    return main(["--model", model_dir, "--output_dir", str(checkpoint.parent), *FAST,
                 "--resume_from_checkpoint", str(checkpoint), *flags])


@pytest.mark.parametrize("flags, shown", [
    (["--seed", "2"], "--seed: 1234 in the checkpoint, 2 in this run"),
    (["--recipe", "lora"], "--recipe: A_rand_hB_zero in the checkpoint, hA_he_hB_zero in this run"),
    (["--lora_r", "8"], "--lora_r: 16 in the checkpoint, 8 in this run"),
    (["--lora_alpha", "16"], "--lora_alpha: 32 in the checkpoint, 16 in this run"),
    (["--use_rslora", "true"], "--use_rslora: False in the checkpoint, True in this run"),
    (["--target_modules", "q_proj", "v_proj"],
     "--target_modules: down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj in the checkpoint, q_proj,v_proj in this run"),
])
def test_resume_refuses_a_checkpoint_made_with_other_settings(fast_run, model_dir, tmp_path, caplog, capsys, flags, shown):
    """Exit 4 (a stale checkpoint: a sweep starts the cell afresh), one line on stderr."""
    checkpoint = _copy_checkpoint(fast_run, tmp_path)
    caplog.set_level(logging.INFO)
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        _resume(model_dir, checkpoint, *flags)
    assert refused.value.code == 4, refused.value.code
    (message,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("asymllm train: error:")]
    assert message.startswith(f"asymllm train: error: --resume_from_checkpoint {checkpoint}:") and shown in message, message
    assert f"model {model_dir} in" not in caplog.text  # refused before the model was loaded
    assert not (checkpoint.parent / "adapter").exists()


def test_resume_of_an_unchanged_checkpoint_rebuilds_its_frozen_A_exactly(fast_run, model_dir, tmp_path, caplog):
    checkpoint = _copy_checkpoint(fast_run, tmp_path)
    caplog.set_level(logging.INFO)
    result = _resume(model_dir, checkpoint, "--recipe", "asym")  # an alias of the same recipe is the same recipe
    assert result["steps"] == 2
    assert _restored(caplog.text) == (runs.N_TENSORS // 2, str(checkpoint), 0.0)


def test_resume_refuses_a_frozen_rand_A_its_seed_does_not_rebuild(fast_run, model_dir, tmp_path):
    checkpoint = _copy_checkpoint(fast_run, tmp_path)
    key, _ = _change_one_A(checkpoint, CHANGE)
    with pytest.raises(SystemExit) as refused:
        _resume(model_dir, checkpoint)
    message = str(refused.value)
    module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
    assert f"--resume_from_checkpoint {checkpoint}:" in message and f"{module}" in message and "rand" in message, message
    assert not (checkpoint.parent / "adapter").exists()


def test_resume_reports_how_far_a_rebuilt_V_factor_is_and_keeps_the_checkpoint_s(model_dir, tmp_path, caplog):
    """An SVD init is only as reproducible as its kernel: a difference is reported, measured
    before the Trainer loads the checkpoint (after, it would read 0), and the file's value wins."""
    out = tmp_path / "out"
    main(["--model", model_dir, "--output_dir", str(out), *FAST, "--recipe", "A_V_hB_zero"])
    checkpoint = out / "checkpoint-1"
    key, changed = _change_one_A(checkpoint, CHANGE)
    caplog.set_level(logging.INFO)
    _resume(model_dir, checkpoint, "--recipe", "A_V_hB_zero")
    count, source, worst = _restored(caplog.text)
    assert (count, source) == (runs.N_TENSORS // 2, str(checkpoint))
    assert worst == pytest.approx(CHANGE, rel=1e-2)
    assert torch.equal(runs.adapter_tensors(out / "adapter")[key], changed)


def test_resume_accepts_a_checkpoint_whose_frozen_A_was_stored_in_bf16(fast_run, model_dir, tmp_path, caplog):
    """ZeRO-1/2 with bf16 casts every parameter, the frozen A too, so a GPU run's checkpoint holds
    bf16(A): the rebuilt fp32 A is the same factor once rounded the same way, not another seed's."""
    checkpoint = _copy_checkpoint(fast_run, tmp_path)
    tensors = {k: v.to(torch.bfloat16) for k, v in runs.adapter_tensors(checkpoint).items()}
    _save_adapter_file(checkpoint, tensors)
    caplog.set_level(logging.INFO)
    assert _resume(model_dir, checkpoint)["steps"] == 2
    assert _restored(caplog.text)[0] == runs.N_TENSORS // 2
    # ... and a bf16 A that is not the rounded rebuild is still refused
    checkpoint = _copy_checkpoint(fast_run, tmp_path / "other")
    tensors = runs.adapter_tensors(checkpoint)
    key = runs.factor_keys(tensors, "lora_A")[0]
    tensors = {k: (v + (0.05 if k == key else 0.0)).to(torch.bfloat16) for k, v in tensors.items()}
    _save_adapter_file(checkpoint, tensors)
    with pytest.raises(SystemExit, match="rebuilt here differs from the checkpoint's"):
        _resume(model_dir, checkpoint)


# --- "Numbers users can trust, round 2": check first, delete last; incomplete saves cleaned up

QUICK = ["--max_steps", "3", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
         "--eval_strategy", "no", "--lora_r", "4", "--lora_alpha", "8"]


@pytest.mark.parametrize("bad_model", ["no-such-model", "broken-config"])
def test_overwrite_output_dir_keeps_the_earlier_run_when_the_new_one_is_refused(model_dir, tmp_path, bad_model):
    """A typo in --model (no such folder: check_model_path) or a folder that is no model (its config
    unreadable: the preflight) is refused before --overwrite_output_dir deletes anything."""
    out = tmp_path / "out"
    main(["--model", model_dir, "--output_dir", str(out), *QUICK, "--max_steps", "1"])
    before = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert before == ["adapter", "checkpoint-1"]
    model = tmp_path / bad_model
    if bad_model == "broken-config":
        model.mkdir()
        (model / "config.json").write_text("{not json")
    with pytest.raises(SystemExit) as refused:
        main(["--model", str(model), "--output_dir", str(out), "--overwrite_output_dir", *QUICK])
    assert f"--model {model}" in str(refused.value), refused.value
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == before, "the refused run deleted the earlier one"
    verify_adapter_dir(str(out / "adapter"))


def test_incomplete_checkpoints_are_removed_once_a_complete_one_replaces_them(model_dir, tmp_path, caplog):
    """incomplete-checkpoint-N (a half-written save moved aside) goes once checkpoint-M, M >= N, is
    complete; one no complete checkpoint has reached yet stays until then (here: the run's end)."""
    out = tmp_path / "out"
    flags = ["--model", model_dir, "--output_dir", str(out), *QUICK, *RESUME]
    assert main([*flags, "--stop_after_steps", "1"])["stopped_at"] == 1
    for step in (2, 3):  # what two killed saves leave: a copy without its completion marker
        shutil.copytree(out / "checkpoint-1", out / f"checkpoint-{step}")
        (out / f"checkpoint-{step}" / "asymllm_checkpoint.json").unlink()
    caplog.set_level(logging.INFO)
    assert main([*flags, "--stop_after_steps", "2"])["stopped_at"] == 2  # resumes checkpoint-1 past the two
    assert f"{out / 'checkpoint-2'} was an incomplete save of an earlier attempt: moved to {out / 'incomplete-checkpoint-2'}" in caplog.text
    assert f"removed {out / 'incomplete-checkpoint-2'}: {out / 'checkpoint-2'} is complete" in caplog.text
    assert not (out / "incomplete-checkpoint-2").exists()
    assert (out / "checkpoint-3").exists() and not (out / "incomplete-checkpoint-3").exists()  # nothing replaced it yet
    assert main(flags)["steps"] == 3
    assert f"removed {out / 'incomplete-checkpoint-3'}: {out / 'checkpoint-3'} is complete" in caplog.text
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-3"]
