"""Resume: a run stopped after step 4 and resumed ends with the same adapter as one never
stopped (max abs diff <= 1e-6, the frozen A bit-identical), in one process and under
2-rank ZeRO-3, with a non-default seed (1234).

Each interrupted run is the *same command twice*, `--resume_from_checkpoint auto` included:
the first time (with `--stop_after_steps 4`) the output folder is empty, so `auto` must
say so and start from scratch; the second time it must continue from checkpoint-4.

The ZeRO-3 trap (DESIGN.md trap 12): the DeepSpeed checkpoint the Trainer writes leaves
frozen parameters out (checked below on the files), so a frozen A comes back only because
asymllm restores it. That is checked with an A that rebuilding from the seed does NOT
reproduce (tests/dist/sft_probe.py perturbs it before training): the resumed run must
still end with the checkpoint's A and the uninterrupted run's adapter.

About 75 s on a quiet 2-core machine after tests/test_train_distributed.py (whose
uninterrupted runs it reuses), about 100 s alone.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist"))

import sft_runs as runs  # noqa: E402
from asymllm import verify_adapter_dir  # noqa: E402

pytestmark = pytest.mark.slow

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


@pytest.fixture(scope="module")
def zero3_unrebuildable_A(tmp_path_factory, zero3, model_dir):
    """Resume the ZeRO-3 run, as interrupted, with a rebuilt A that differs from the checkpoint's."""
    out = zero3["copy"]
    args = ("--per_device_train_batch_size", str(runs.GLOBAL_BATCH // 2), "--deepspeed", runs.zero3_config(tmp_path_factory))
    result = runs.launch([runs.torchrun_command(out, model_dir, *args, *RESUME, script=runs.PROBE)], out.parent,
                         env=runs.base_env(ASYMLLM_PERTURB_FROZEN=PERTURBATION), what="resume perturbed A")
    return {"output_dir": out, "resumed": result}


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


def test_auto_without_a_checkpoint_says_so_and_starts(single, zero3):
    for run in (single, zero3):
        out, log = run["output_dir"], run["stopped"].log
        assert f"resume auto: no checkpoint in {out}; starting from scratch" in log
        assert f"stopped at step {runs.SAVE_STEPS} as asked (--stop_after_steps)" in log
        assert runs.RESTORED.search(log) is None
    interrupted = zero3["copy"]   # what the stopped run left: checkpoint-4, no final adapter
    assert sorted(p.name for p in interrupted.iterdir() if p.is_dir()) == ["checkpoint-4"]
    assert not (interrupted / "metrics.json").exists()


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


def test_zero3_resume_equals_uninterrupted(zero3, uninterrupted_zero3):
    out = zero3["output_dir"]
    log = zero3["resumed"].log
    assert f"resume auto: continuing from {out / 'checkpoint-4'}" in log
    # A was rebuilt from the recorded seed identically (difference 0), then set from the file.
    assert _restored(log) == (runs.N_TENSORS // 2, str(out / "checkpoint-4"), 0.0)
    _assert_same_adapter(out / "adapter", uninterrupted_zero3.output_dir / "adapter", "ZeRO-3, 2 ranks")
    _assert_same_adapter(out / "checkpoint-8", uninterrupted_zero3.output_dir / "checkpoint-8", "ZeRO-3, checkpoint-8")


def test_zero3_deepspeed_checkpoint_leaves_frozen_A_out(zero3):
    """The trap itself, on the files: only the adapter file of checkpoint-4 holds A."""
    checkpoint = zero3["copy"] / "checkpoint-4"
    for states in runs.deepspeed_model_states(checkpoint):
        keys = list(states["module"])
        assert keys and all(".lora_B." in k for k in keys), keys
        assert not states.get("frozen_param_shapes")
    assert len(runs.factor_keys(runs.adapter_tensors(checkpoint), "lora_A")) == runs.N_TENSORS // 2


def test_zero3_resume_restores_a_frozen_A_that_the_seed_does_not_rebuild(zero3_unrebuildable_A, uninterrupted_zero3):
    out, log = zero3_unrebuildable_A["output_dir"], zero3_unrebuildable_A["resumed"].log
    assert f"perturbed {runs.N_TENSORS // 2} frozen factor tensors" in log
    count, source, worst = _restored(log)
    assert (count, source) == (runs.N_TENSORS // 2, str(out / "checkpoint-4"))
    assert worst > PERTURBATION, f"the restore saw no difference ({worst}); the perturbation did not reach it"
    _assert_same_adapter(out / "adapter", uninterrupted_zero3.output_dir / "adapter", "ZeRO-3, A not rebuildable")


def test_resume_from_a_missing_path_is_a_clear_error(tmp_path, model_dir):
    missing = tmp_path / "no-such-checkpoint"
    result = runs.launch([runs.single_command(tmp_path / "out", model_dir, "--resume_from_checkpoint", str(missing))],
                         tmp_path, expect_ok=False, what="missing checkpoint")
    assert result.returncodes[0] != 0
    assert f"--resume_from_checkpoint {missing}: no such checkpoint folder" in result.log
    assert "Traceback" not in result.log
    assert not (tmp_path / "out" / "adapter").exists()
