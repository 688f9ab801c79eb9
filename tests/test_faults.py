"""Cluster faults, for real: preemption signals, a killed rank, half-written or damaged
checkpoints, a diverged loss, and mistakes found before the model loads.

The 2-rank drills run `launch/sft.py` (through tests/dist/sft_probe.py, which only pauses a rank
at an exact step or poisons one rank's loss: the faults are real signals and kills) under
torchrun with DeepSpeed ZeRO-3 on CPU, and compare each final adapter with the uninterrupted
2-rank ZeRO-3 run of tests/test_train_distributed.py (same seed, data and global batch). Those
are marked slow; the single-process checks take seconds each.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist"))

import sft_runs as runs  # noqa: E402
from asymllm.adapters.recipe import Recipe  # noqa: E402
from asymllm.training.checkpoints import MARKER, check_complete  # noqa: E402
from asymllm.training.faults import DIVERGED_FILE, check_not_diverged_before  # noqa: E402
from asymllm.training.preflight import adapter_shape_counts, checkpoint_bytes  # noqa: E402
from asymllm.training.train import main  # noqa: E402

slow = pytest.mark.slow
RESUME = ("--resume_from_checkpoint", "auto")
ZERO3_BATCH = ("--per_device_train_batch_size", str(runs.GLOBAL_BATCH // 2))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return runs.tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return runs.uninterrupted_single(tmp_path_factory)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return runs.uninterrupted_zero3(tmp_path_factory)


def _refusal(argv: list[str]) -> str:
    """Run `asymllm train` in this process; it must stop with a message (no traceback)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert isinstance(stopped.value.code, str), f"exit {stopped.value.code!r}, not a message"
    return stopped.value.code


def _interrupted_copy(single, tmp_path) -> "os.PathLike":
    """The uninterrupted single-process run's folder as a run killed after checkpoint-8 was
    written would leave it: no final adapter, no metrics."""
    out = tmp_path / "out"
    shutil.copytree(single.output_dir, out)
    shutil.rmtree(out / "adapter")
    (out / "metrics.json").unlink()
    return out


# ---- 3. no half-written checkpoint is ever resumed


@slow
def test_every_checkpoint_carries_a_marker_of_its_files(single, zero3):
    for run in (single, zero3):
        for name in ("checkpoint-4", "checkpoint-8"):
            folder = run.output_dir / name
            check_complete(str(folder))
            recorded = json.loads((folder / MARKER).read_text())
            on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
            assert sorted(recorded["files"]) == on_disk and recorded["step"] == int(name.split("-")[1])
            assert "adapter_model.safetensors" in recorded["files"]
    shards = [f for f in json.loads((zero3.output_dir / "checkpoint-8" / MARKER).read_text())["files"] if "optim_states" in f]
    assert len(shards) == 2, f"both ranks' DeepSpeed shards are covered by the marker: {shards}"


@slow
def test_auto_skips_a_half_written_checkpoint_and_resumes_the_one_before(single, model_dir, tmp_path):
    out = _interrupted_copy(single, tmp_path)
    (out / "checkpoint-8" / MARKER).unlink()   # killed while saving: no marker, the adapter file cut short
    weights = out / "checkpoint-8" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    batch = ("--per_device_train_batch_size", str(runs.GLOBAL_BATCH))
    log = runs.launch([runs.single_command(out, model_dir, *batch, *RESUME)], tmp_path, what="resume past a half-written checkpoint").log
    assert f"resume auto: skipped an incomplete checkpoint: {out / 'checkpoint-8'} has no {MARKER}: its save did not finish" in log
    assert f"resume auto: continuing from {out / 'checkpoint-4'}" in log
    assert f"{out / 'checkpoint-8'} was an incomplete save of an earlier attempt: moved to {out / 'incomplete-checkpoint-8'}" in log
    check_complete(str(out / "checkpoint-8"))  # written again, whole
    diff = runs.max_abs_diff(runs.adapter_tensors(out / "adapter"), runs.adapter_tensors(single.output_dir / "adapter"))
    print(f"half-written checkpoint-8 skipped, resumed from checkpoint-4: max abs diff vs uninterrupted {diff:.3g}")
    assert diff <= 1e-6, f"resumed past a half-written checkpoint vs uninterrupted: max abs diff {diff:.3g}"


@slow
def test_a_damaged_checkpoint_with_its_marker_is_refused_naming_the_file(single, model_dir, tmp_path):
    out = _interrupted_copy(single, tmp_path)
    weights = out / "checkpoint-8" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed after the save completed
    weights.write_bytes(bytes(data))
    argv = ["--model", model_dir, "--output_dir", str(out), *runs.COMMON]
    message = _refusal(argv + list(RESUME))
    assert message == (f"asymllm train: error: --resume_from_checkpoint auto: {weights} is damaged (its sha256 changed since it "
                       "was saved); resume from another checkpoint (--resume_from_checkpoint PATH) or restore the file")
    explicit = _refusal(argv + ["--resume_from_checkpoint", str(out / "checkpoint-8")])
    assert f"--resume_from_checkpoint {out / 'checkpoint-8'}: {weights} is damaged" in explicit
    assert weights.read_bytes() == bytes(data) and not (out / "adapter").exists(), "the refusal changed the folder"


# ---- 5. fail before the hour: before the model loads


def _read_only_dir(tmp_path):
    """A folder nobody can write: a read-only bind mount as root (chmod does not stop root), else chmod 555."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        return folder, lambda: folder.chmod(0o755)
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
    return folder, lambda: subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_output_folder_is_an_immediate_clear_error(model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)  # so that a model load, logged at INFO, would be seen
    folder, undo = _read_only_dir(tmp_path)
    try:
        for out in (folder, folder / "run"):  # the folder itself, and one to be made inside it
            caplog.clear()
            message = _refusal(["--model", model_dir, "--output_dir", str(out), "--max_steps", "1"])
            reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
            assert message == (f"asymllm train: error: --output_dir {out}: cannot write there ({reason}); checkpoints and "
                               "the adapter go there: choose a writable folder")
            assert "in float32, attention" not in caplog.text, "the model was loaded before the output folder was checked"
    finally:
        undo()


def test_an_output_folder_without_room_for_a_checkpoint_is_refused(model_dir, tmp_path, caplog):
    if os.geteuid() != 0:
        pytest.skip("needs a small filesystem (tmpfs size=1m), which only root can mount here")
    caplog.set_level(logging.INFO)
    folder = tmp_path / "full"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], check=True)
    try:
        message = _refusal(["--model", model_dir, "--output_dir", str(folder), "--max_steps", "1"])
        adapter, trainable = adapter_shape_counts(model_dir, None, 16, Recipe.parse("A_rand_hB_zero"))
        needed = checkpoint_bytes(adapter, trainable) / 2**20
        assert message == (f"asymllm train: error: --output_dir {folder}: 1.0 MiB free, and one checkpoint needs about "
                           f"{needed:.1f} MiB ({adapter:,} adapter parameters, {trainable:,} trained); free some space or "
                           "choose another --output_dir")
        assert "in float32, attention" not in caplog.text
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@slow
def test_the_checkpoint_estimate_counts_the_real_adapter_and_covers_a_real_checkpoint(single, zero3, model_dir):
    adapter, trainable = adapter_shape_counts(model_dir, None, runs.R, Recipe.parse(runs.RECIPE))
    tensors = runs.adapter_tensors(single.output_dir / "checkpoint-8")
    assert adapter == sum(t.numel() for t in tensors.values())
    assert trainable == sum(t.numel() for k, t in tensors.items() if ".lora_B." in k)  # B only: A is frozen
    for run in (single, zero3):
        size = sum(p.stat().st_size for p in (run.output_dir / "checkpoint-8").rglob("*") if p.is_file())
        assert size <= checkpoint_bytes(adapter, trainable), f"{run.output_dir}: a checkpoint of {size} bytes"


@slow
def test_ranks_started_with_different_settings_stop_naming_the_rank(model_dir, tmp_path_factory):
    """Two torchrun "nodes", the second launched with another --seed (as from another config):
    both stop before the model loads, with the same message."""
    out = tmp_path_factory.mktemp("disagree") / "out"
    port = runs.free_port()
    commands = [runs.torchrun_command(out, model_dir, *ZERO3_BATCH, "--deepspeed", runs.zero3_config(tmp_path_factory),
                                      *(["--seed", "7"] if node else []), nproc=1, port=port,
                                      node_args=("--nnodes", "2", "--node_rank", str(node))) for node in (0, 1)]
    result = runs.launch(commands, out.parent, expect_ok=False, what="ranks disagree")
    assert all(rc != 0 for rc in result.returncodes), result.returncodes
    expected = (f"asymllm train: error: the ranks were started with different settings (--seed 7 on rank 1, {runs.SEED} on "
                "rank 0); every rank (every node's launch command) must get the same flags and config file")
    for log in result.logs:
        assert expected in log
        assert "in float32, attention" not in log


# ---- 4. a diverged loss stops the run, not the cluster budget


def test_a_diverged_loss_stops_the_run_and_the_last_good_checkpoint_resumes(model_dir, tmp_path):
    """lr 1e30 takes the tiny model's loss to NaN at step 2. Stopped there with exit 3 and
    checkpoint-1 untouched; resumed with --max_bad_steps 2, steps 2 and 3 are skipped (their
    checkpoints hold checkpoint-1's adapter: no optimizer step) and step 4 stops it."""
    out = tmp_path / "out"
    diverging = ["--learning_rate", "1e30", "--warmup_steps", "0", "--max_steps", "6", "--save_steps", "1", "--logging_steps", "1"]
    command = runs.single_command(out, model_dir, *diverging, *RESUME)
    first = runs.launch([command], tmp_path, expect_ok=False, what="diverging run")
    assert first.returncodes == [3]
    assert (f"asymllm train: stopped: step 2: the loss is not finite on rank 0; nothing was saved after it. The last good "
            f"checkpoint is {out / 'checkpoint-1'}") in first.log
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-1"]
    check_complete(str(out / "checkpoint-1"))
    good = runs.adapter_tensors(out / "checkpoint-1")
    assert json.loads((out / DIVERGED_FILE).read_text())["last_good_checkpoint"] == str(out / "checkpoint-1")

    second = runs.launch([command + ["--max_bad_steps", "2"]], tmp_path, expect_ok=False, what="skipping run")
    assert second.returncodes == [3]
    log = second.log
    assert f"resume auto: continuing from {out / 'checkpoint-1'}" in log
    for step, n in ((2, 1), (3, 2)):
        assert f"step {step}: the loss is not finite on rank 0: its optimizer step is skipped ({n} of at most 2, --max_bad_steps)" in log
        check_complete(str(out / f"checkpoint-{step}"))
        assert runs.max_abs_diff(runs.adapter_tensors(out / f"checkpoint-{step}"), good) == 0.0, f"step {step} changed the adapter"
    assert "asymllm train: stopped: step 4: the loss is not finite on rank 0 (after 2 skipped steps, --max_bad_steps 2)" in log
    assert not (out / "checkpoint-4").exists() and not (out / "adapter").exists()


def test_a_torchrun_restart_after_divergence_stops_at_once_and_a_new_launch_goes_on(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / DIVERGED_FILE).write_text(json.dumps({"where": "step 7: the loss is not finite on rank 1"}))
    argv = ["--model", model_dir, "--output_dir", str(out), *runs.COMMON, *RESUME]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 3 and (out / DIVERGED_FILE).exists()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # a new launch: the user chose to go on
    check_not_diverged_before(str(out))
    assert not (out / DIVERGED_FILE).exists()


def test_max_bad_steps_is_checked_before_anything_loads(model_dir, tmp_path):
    message = _refusal(["--model", model_dir, "--output_dir", str(tmp_path / "o"), "--max_bad_steps", "-1"])
    assert message == "asymllm train: error: --max_bad_steps -1: must be a whole number of steps >= 0 (0: stop at the first)"


@slow
def test_a_loss_that_is_not_finite_on_one_rank_is_handled_on_every_rank(model_dir, zero3, tmp_path_factory):
    """ZeRO-3, 2 ranks: rank 1's loss is NaN at steps 3 and 5. With --max_bad_steps 1 both ranks
    skip step 3 together (its backward and optimizer step), and both stop at step 5, exit 3."""
    out = tmp_path_factory.mktemp("nan_one_rank") / "out"
    command = runs.torchrun_command(out, model_dir, *ZERO3_BATCH, "--deepspeed", runs.zero3_config(tmp_path_factory),
                                    "--save_steps", "2", "--max_bad_steps", "1", script=runs.PROBE)
    result = runs.launch([command], out.parent, env=runs.base_env(ASYMLLM_NAN_AT_STEPS="3,5"), expect_ok=False,
                         what="NaN on rank 1")
    log = result.log
    assert result.returncodes != [0]
    skipped = "step 3: the loss is not finite on rank 1: its optimizer step is skipped (1 of at most 1, --max_bad_steps)"
    assert f"[asymllm rank0] {skipped}" in log and f"[asymllm rank1] {skipped}" in log  # agreed: rank 0's loss was finite
    assert (f"asymllm train: stopped: step 5: the loss is not finite on rank 1 (after 1 skipped step, --max_bad_steps 1); "
            f"nothing was saved after it. The last good checkpoint is {out / 'checkpoint-4'}") in log
    assert "[asymllm rank0] step 4/8" in log, "rank 0 did not train on past the skipped step"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    check_complete(str(out / "checkpoint-4"))
    for name in ("checkpoint-2", "checkpoint-4"):
        assert all(t.isfinite().all() for t in runs.adapter_tensors(out / name).values()), name


# ---- 1. preemption and time limits; 2. a lost rank


def test_a_signalled_single_process_run_exits_143_or_138_with_the_step_checkpointed(model_dir, tmp_path):
    """No launcher in between: the process's own exit code says which signal stopped it."""
    for sig, code, strategy in ((signal.SIGTERM, 143, "no"), (signal.SIGUSR1, 138, "epoch")):
        out, pause = tmp_path / sig.name / "out", tmp_path / sig.name / "pause"
        command = runs.single_command(out, model_dir, "--save_strategy", strategy, *RESUME, script=runs.PROBE)
        stopped = runs.launch_with_fault(command, out.parent, runs.base_env(ASYMLLM_PAUSE_BEFORE_STEP=3, ASYMLLM_PAUSE_DIR=pause),
                                         pause, lambda _, paused: os.kill(paused["pid"], sig), what=f"{sig.name} to the process")
        assert stopped.launch.returncodes == [code]
        assert (f"asymllm train: stopped by {sig.name} at step 3 of 8; {out / 'checkpoint-3'} is complete. Exit code {code}."
                in stopped.launch.log)
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-3"]
        check_complete(str(out / "checkpoint-3"))
        assert "step 3/8 (38%) | loss" in stopped.launch.log, "the stop step's loss was not logged (logging_steps is 4)"


@slow
def test_sigterm_to_torchrun_checkpoints_that_step_and_the_resume_ends_as_if_uninterrupted(model_dir, zero3, tmp_path_factory):
    out = tmp_path_factory.mktemp("preempted") / "out"
    pause = out.parent / "pause"
    command = runs.torchrun_command(out, model_dir, *ZERO3_BATCH, "--deepspeed", runs.zero3_config(tmp_path_factory),
                                    "--save_strategy", "no", *RESUME, script=runs.PROBE)
    env = runs.base_env(ASYMLLM_PAUSE_BEFORE_STEP=4, ASYMLLM_PAUSE_DIR=pause)
    stopped = runs.launch_with_fault(command, out.parent, env, pause, lambda proc, _: os.kill(proc.pid, signal.SIGTERM),
                                     watch=("stopped by SIGTERM",), what="SIGTERM to torchrun")
    log = stopped.launch.log
    assert (f"asymllm train: stopped by SIGTERM at step 4 of 8; {out / 'checkpoint-4'} is complete. Exit code 143. Continue "
            "with the same command and --resume_from_checkpoint auto") in log
    # torchrun itself exits 1 after passing a signal on (its SignalException); each worker exited 143
    assert stopped.launch.returncodes == [1] and "Received 15 death signal, shutting down workers" in log
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-4"]  # --save_strategy no: the signal's save only
    check_complete(str(out / "checkpoint-4"))
    resumed = runs.launch([command], out.parent, what="resume after SIGTERM")
    assert f"resume auto: continuing from {out / 'checkpoint-4'}" in resumed.log
    diff = runs.max_abs_diff(runs.adapter_tensors(out / "adapter"), runs.adapter_tensors(zero3.output_dir / "adapter"))
    lost = stopped.launch.seconds + resumed.seconds - zero3.launch.seconds
    print(f"SIGTERM at step 4: torchrun exit {stopped.launch.returncodes[0]}, fault to stopped "
          f"{stopped.launch.seconds - stopped.fault_at:.1f} s, resume {resumed.seconds:.1f} s; uninterrupted {zero3.launch.seconds:.1f} s, "
          f"lost {lost:.1f} s; max abs diff vs uninterrupted {diff:.3g}")
    assert diff <= 1e-6, f"preempted and resumed vs uninterrupted: max abs diff {diff:.3g}"


@slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(model_dir, tmp_path_factory):
    """SIGTERM to rank 1 alone (as when a node's processes are signalled one by one): rank 0,
    never signalled, learns of it through the collective and stops at the same step."""
    out = tmp_path_factory.mktemp("one_rank_signalled") / "out"
    pause = out.parent / "pause"
    command = runs.torchrun_command(out, model_dir, *ZERO3_BATCH, "--deepspeed", runs.zero3_config(tmp_path_factory),
                                    "--save_strategy", "no", *RESUME, script=runs.PROBE)
    env = runs.base_env(ASYMLLM_PAUSE_BEFORE_STEP=4, ASYMLLM_PAUSE_RANK=1, ASYMLLM_PAUSE_DIR=pause)
    stopped = runs.launch_with_fault(command, out.parent, env, pause, lambda _, paused: os.kill(paused["pid"], signal.SIGTERM),
                                     what="SIGTERM to rank 1")
    log = stopped.launch.log
    assert f"asymllm train: stopped by SIGTERM at step 4 of 8; {out / 'checkpoint-4'} is complete. Exit code 143." in log  # said by rank 0
    assert "[asymllm rank0] received SIGTERM" not in log
    assert log.count("exitcode  : 143") >= 1 and "exitcode  : 1 " not in log
    check_complete(str(out / "checkpoint-4"))


@slow
def test_a_killed_rank_is_restarted_by_torchrun_and_the_job_finishes_as_if_uninterrupted(model_dir, zero3, tmp_path_factory):
    out = tmp_path_factory.mktemp("lost_rank") / "out"
    pause = out.parent / "pause"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{runs.free_port()}", runs.PROBE,
               "--model", model_dir, "--output_dir", str(out), *runs.COMMON, *ZERO3_BATCH,
               "--deepspeed", runs.zero3_config(tmp_path_factory), *RESUME]
    # pytorch#135712: a rendezvous store shared with the workers hands a restarted group the
    # previous attempt's addresses (gloo: "connectFullMesh failed ... Connection refused")
    env = runs.base_env(ASYMLLM_PAUSE_BEFORE_STEP=6, ASYMLLM_PAUSE_RANK=1, ASYMLLM_PAUSE_DIR=pause,
                        TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
    continuing = f"resume auto: continuing from {out / 'checkpoint-4'}"
    job = runs.launch_with_fault(command, out.parent, env, pause, lambda _, paused: os.kill(paused["pid"], signal.SIGKILL),
                                 watch=(continuing, f"done: {runs.MAX_STEPS} steps"), what="SIGKILL rank 1")
    assert job.launch.returncodes == [0], job.launch.log[-6000:]
    assert continuing in job.launch.log
    assert "shares its rendezvous store" not in job.launch.log  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 given
    check_complete(str(out / "checkpoint-8"))
    diff = runs.max_abs_diff(runs.adapter_tensors(out / "adapter"), runs.adapter_tensors(zero3.output_dir / "adapter"))
    print(f"SIGKILL rank 1 at step 6: continuing {job.seen_at[continuing] - job.fault_at:.1f} s after the kill; "
          f"job {job.launch.seconds:.1f} s, uninterrupted {zero3.launch.seconds:.1f} s, lost {job.launch.seconds - zero3.launch.seconds:.1f} s; "
          f"max abs diff vs uninterrupted {diff:.3g}")
    assert diff <= 1e-6, f"restarted after a lost rank vs uninterrupted: max abs diff {diff:.3g}"


SLURM_SCRIPT = runs.REPO / "launch" / "slurm_sft.sbatch"


def _fake_slurm(bin_dir, calls):
    """`srun` that runs its command on this machine, `scontrol` that records a requeue: the
    script's own logic (signal traps, the torchrun flags, the requeue decision) runs for real."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\nif [ "$1" = show ]; then echo 127.0.0.1; else echo "$@" >> {calls}; fi\n')
    (bin_dir / "torchrun").write_text(f'#!/bin/bash\nexec {sys.executable} -m torch.distributed.run "$@"\n')
    for name in ("srun", "scontrol", "torchrun"):
        (bin_dir / name).chmod(0o755)


@slow
def test_slurm_script_time_limit_signal_checkpoints_requeues_and_the_requeued_job_resumes(model_dir, zero3, tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm")
    out, pause, calls = base / "out", base / "pause", base / "scontrol_calls"
    _fake_slurm(base / "bin", calls)
    env = runs.base_env(PATH=f"{base / 'bin'}{os.pathsep}{os.environ['PATH']}", SLURM_SUBMIT_DIR=runs.REPO, SLURM_JOB_ID="4242",
                        SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", GPUS_PER_NODE="2", MASTER_PORT=runs.free_port(),
                        DS_CONFIG=runs.zero3_config(tmp_path_factory), SFT=runs.PROBE, VENV=base / "no-venv",
                        ASYMLLM_PAUSE_BEFORE_STEP=4, ASYMLLM_PAUSE_DIR=pause)
    command = ["bash", str(SLURM_SCRIPT), "--model", model_dir, "--output_dir", str(out), *runs.COMMON, *ZERO3_BATCH,
               "--save_strategy", "no"]
    # Slurm's --signal=B:USR1@180 reaches the batch shell only
    stopped = runs.launch_with_fault(command, base, env, pause, lambda proc, _: os.kill(proc.pid, signal.SIGUSR1),
                                     what="USR1 to the batch script")
    log = stopped.launch.log
    assert f"stopped by SIGUSR1 at step 4 of 8; {out / 'checkpoint-4'} is complete. Exit code 138." in log
    assert "asymllm: stopped for the time limit" in log and calls.read_text().split() == ["requeue", "4242"]
    assert stopped.launch.returncodes != [0]
    check_complete(str(out / "checkpoint-4"))
    calls.unlink()
    env.pop("ASYMLLM_PAUSE_BEFORE_STEP")
    again = runs.launch([command], base, env=env, what="requeued job")  # the same script and flags, as Slurm reruns it
    assert f"resume auto: continuing from {out / 'checkpoint-4'}" in again.log and not calls.exists()
    diff = runs.max_abs_diff(runs.adapter_tensors(out / "adapter"), runs.adapter_tensors(zero3.output_dir / "adapter"))
    lost = stopped.launch.seconds + again.seconds - zero3.launch.seconds
    print(f"USR1 (time limit) at step 4 through the Slurm script: exit {stopped.launch.returncodes[0]}, fault to stopped "
          f"{stopped.launch.seconds - stopped.fault_at:.1f} s; requeued job {again.seconds:.1f} s, lost {lost:.1f} s; max abs diff {diff:.3g}")
    assert diff <= 1e-6
