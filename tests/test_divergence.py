"""A loss that explodes but stays finite, and a skipped step under fp16's GradScaler: real runs.

The divergence bound (training/faults.py): a step's loss above max(ln(V/2), 2 x the first
step's loss) for DIVERGED_STEPS steps in a row stops the run as a non-finite loss does (exit 3).
The exploding runs use a tiny Llama first trained for real (all weights, a few seconds) so
that, like a pretrained base, it starts well below ln V; an untrained one starts at ln V.

fp16 with a GradScaler: accelerate builds one only off the CPU (its check is
`device.type != "cpu"`). Run as a script, this file is `launch/sft.py` (through
tests/dist/sft_probe.py, for its NaN injection) with accelerate's own scaler put where
accelerate puts it on a GPU (`get_grad_scaler`, the torch CPU GradScaler) and fp16 autocast
on: the code path of `--fp16` on a GPU, on this CPU.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist"))

import sft_runs as runs  # noqa: E402
from asymllm.training.checkpoints import check_complete  # noqa: E402
from asymllm.training import faults  # noqa: E402
from asymllm.training.faults import DIVERGED_FILE, EXIT_DIVERGED  # noqa: E402

slow = pytest.mark.slow
SCALER_LINE = re.compile(r"\[grad scaler\] step (\d+): scale (\S+) -> (\S+)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return runs.tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """The tiny Llama after 400 steps of full training on the built-in data (seconds): its
    first LoRA step's loss is about 1.9, against ln V = 6.24, as a pretrained base starts."""
    return runs.shared("trained_tiny", lambda: _pretrain(runs.tiny_model_dir(tmp_path_factory),
                                                          str(tmp_path_factory.mktemp("trained") / "model")))


def _pretrain(source: str, target: str, steps: int = 400) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asymllm.data import BUILTIN_DATASET, load_examples
    from asymllm.tokenizer import ensure_chat_template, ensure_pad_token
    from asymllm.training.tokenize import tokenize_examples

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(source)
    ensure_chat_template(tokenizer)
    ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    rows, _ = tokenize_examples(load_examples(BUILTIN_DATASET)[0], tokenizer, max_length=512)
    rows = [(r["input_ids"], r["labels"]) for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = [rows[(step * 8 + i) % len(rows)] for i in range(8)]
        n = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([ids + [tokenizer.pad_token_id] * (n - len(ids)) for ids, _ in batch])
        labels = torch.tensor([labels + [-100] * (n - len(labels)) for _, labels in batch])
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"step \d+/\d+ \(\d+%\) \| loss ([0-9.e+-]+|nan|inf)", log)]


# ---- the bound


def test_the_bound_is_far_above_the_built_in_defaults_healthy_losses_and_below_its_collapse():
    """The built-in default (SmolLM2-135M-Instruct, V = 49,152): every loss logged by the runs
    of benchmarks/sweep_fair (54 committed; lr 1e-4 to 1e-2, 1-2 epochs, first logs included) is
    below half the bound, and below a third at the rates the study selected from (up to 3e-3; at
    1e-2 a run logged 4.19, still a healthy run, its loss falling); its first step's loss is 4.03 (measured here, batch 8), so
    twice it stays under ln(V/2). A run at --learning_rate 1e6 --max_grad_norm 0 went
    4.03 -> 10.80 (= ln V: uniform logits) and stayed there; that is above the bound."""
    logs = glob.glob(str(runs.REPO / "benchmarks" / "sweep_fair" / "*" / "runs" / "*" / "train.log"))
    logged = [loss for path in logs for loss in _losses(open(path).read())]
    firsts = [json.load(open(p))["first_logged_loss"] for p in
              glob.glob(str(runs.REPO / "benchmarks" / "sweep_fair" / "*" / "runs" / "*" / "train" / "metrics.json"))]
    assert len(logs) >= 50 and len(logged) >= 400 and len(firsts) >= 50
    vocab, first_step = 49152, 4.033
    bound = faults.divergence_bound(vocab, first_step)
    assert bound == pytest.approx(math.log(vocab / 2)) and bound == pytest.approx(10.11, abs=0.01)
    assert max(logged + firsts) < bound / 2, max(logged + firsts)
    grid = [loss for path in logs if "-lr0.01-" not in path for loss in _losses(open(path).read())]
    assert len(grid) >= 400 and max(grid) < bound / 3, max(grid)
    assert math.log(vocab) > bound  # the collapse measured at lr 1e6
    # an untrained model starts at about ln V: then twice its first loss is the bound
    assert faults.divergence_bound(512, 6.256) == pytest.approx(12.512)


def _builtin_command(out, *extra) -> list[str]:
    """`asymllm train` on the built-in default model and data, its first steps logged one by one."""
    from asymllm import builtin

    try:
        builtin.smollm2_gguf_path()
    except builtin.BuiltinModelError:
        if not (Path(builtin.default_cache_dir()) / builtin.CONVERTED_NAME / builtin.MARKER).is_file():
            pytest.skip(f"the built-in default model is not installed ({builtin.INSTALL_HINT})")
    return [sys.executable, "-m", "asymllm.cli", "train", "--output_dir", str(out), "--logging_steps", "1",
            "--save_strategy", "no", "--eval_strategy", "no", *extra]


@slow
def test_the_built_in_defaults_first_steps_stay_far_below_the_bound(tmp_path):
    """The built-in default run as `asymllm train` starts it (lr 1e-3, 5 warmup steps), its
    first 6 steps: the bound stated is ln(V/2) = 10.11 and no step comes near it. (The built-in
    data named as --dataset: the same examples, without the held-out evaluation at the end.)"""
    from asymllm.data import BUILTIN_DATASET

    command = _builtin_command(tmp_path / "out", "--max_steps", "6", "--dataset", BUILTIN_DATASET)
    result = runs.launch([command], tmp_path, what="built-in default")
    assert ("divergence bound: a finite loss above 10.11 = ln(V/2) for a vocabulary of V = 49,152 (within one bit of a "
            "uniform guess, ln V = 10.8)") in result.log
    losses = _losses(result.log)
    assert len(losses) == 6 and max(losses) < faults.divergence_bound(49152) / 2, losses
    assert "above the divergence bound" not in result.log


@slow
def test_the_built_in_default_diverging_far_past_ln_v_is_stopped(tmp_path):
    """--learning_rate 1e-1 --max_grad_norm 0 on the built-in default: measured 4.03 -> 16.7,
    19.0, about 43 (ln V = 10.8; above 2 ln V = 21.6 only at step 4). Stopped at step 4, exit 3."""
    out = tmp_path / "out"
    command = _builtin_command(out, "--max_steps", "8", "--learning_rate", "1e-1", "--max_grad_norm", "0", "--warmup_steps", "0")
    result = runs.launch([command], tmp_path, expect_ok=False, what="built-in default diverging")
    assert result.returncodes == [EXIT_DIVERGED], result.log[-3000:]
    assert (f"asymllm train: stopped: step 4: the loss has been above the divergence bound 10.11 for {faults.DIVERGED_STEPS} "
            "steps in a row (steps 2-4:") in result.log
    assert "No checkpoint had been saved" in result.log and not (out / "adapter").exists()
    assert "ln(V/2) for a vocabulary of V = 49,152" in json.loads((out / DIVERGED_FILE).read_text())["where"]


# ---- a finite explosion stops the run


def test_a_finite_exploding_loss_stops_the_run_as_a_non_finite_one_does(trained_dir, tmp_path):
    """--learning_rate 1e6 --max_grad_norm 0: the loss goes from about 1.9 to ln V (6.24,
    uniform logits) and stays finite. Three steps above the bound stop it: exit 3, the message,
    asymllm_diverged.json naming the step and the bound, checkpoint-1 (the last saved before the
    loss rose) kept, nothing saved after it, no adapter/."""
    out = tmp_path / "out"
    command = runs.single_command(out, trained_dir, "--learning_rate", "1e6", "--max_grad_norm", "0", "--warmup_steps", "0",
                                  "--save_steps", "1", "--save_total_limit", "30", "--logging_steps", "1", "--max_steps", "30")
    result = runs.launch([command], tmp_path, expect_ok=False, what="exploding run")
    log = result.log
    assert result.returncodes == [EXIT_DIVERGED], log[-4000:]
    losses = _losses(log)
    assert all(math.isfinite(loss) for loss in losses) and losses[0] < 2.5, losses
    bound = faults.divergence_bound(512, losses[0])
    assert bound == pytest.approx(math.log(256)), "twice the first loss is below ln(V/2)"
    assert ("divergence bound: a finite loss above 5.545 = ln(V/2) for a vocabulary of V = 512 (within one bit of a "
            f"uniform guess, ln V = 6.238) for {faults.DIVERGED_STEPS} steps in a row stops the run as a non-finite loss does "
            "(exit 3); twice the first step's loss, if higher, is the bound instead") in log
    first_above = next(i + 1 for i, loss in enumerate(losses) if loss > bound)
    stop = first_above + faults.DIVERGED_STEPS - 1
    assert all(loss > bound for loss in losses[first_above - 1:]) and len(losses) == stop - 1, losses  # stopped before its log
    where = (f"step {stop}: the loss has been above the divergence bound 5.545 for {faults.DIVERGED_STEPS} steps in a row "
             f"(steps {first_above}-{stop}:")
    assert f"asymllm train: stopped: {where}" in log and "nothing was saved after it" in log
    last_good = out / f"checkpoint-{first_above - 1}"
    assert f"The last good checkpoint is {last_good}" in log and "Exit code 3." in log
    record = json.loads((out / DIVERGED_FILE).read_text())
    assert record["where"].startswith(where) and "ln(V/2) for a vocabulary of V = 512" in record["where"]
    assert record["last_good_checkpoint"] == str(last_good)
    for step in range(first_above, stop + 1):
        n = step - first_above + 1
        assert re.search(rf"step {step}: the loss \S+ is above the divergence bound 5\.545 \({n} of {faults.DIVERGED_STEPS} in a row\)",
                         log), step
        if step < stop:
            assert f"step {step}: checkpoint-{step} not saved: the loss is above the divergence bound" in log
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"checkpoint-{s}" for s in range(1, first_above)]
    check_complete(str(last_good))


def test_a_healthy_run_of_the_trained_tiny_model_never_nears_the_bound(trained_dir, tmp_path):
    out = tmp_path / "out"
    result = runs.launch([runs.single_command(out, trained_dir, "--logging_steps", "1")], tmp_path, what="healthy run")
    losses = _losses(result.log)
    assert len(losses) == runs.MAX_STEPS and max(losses) < faults.divergence_bound(512, losses[0]) / 2, losses
    assert "above the divergence bound" not in result.log and (out / "adapter").is_dir()


@slow
def test_a_finite_exploding_loss_stops_every_rank_at_the_same_step_under_zero3(trained_dir, tmp_path_factory):
    """2 ranks, ZeRO-3: the bound is checked on the step's loss as logged (the ranks' mean),
    carried by the collective that already tells every rank who saw a non-finite loss."""
    out = tmp_path_factory.mktemp("exploding_zero3") / "out"
    command = runs.torchrun_command(out, trained_dir, "--per_device_train_batch_size", str(runs.GLOBAL_BATCH // 2),
                                    "--deepspeed", runs.zero3_config(tmp_path_factory), "--learning_rate", "1e6",
                                    "--max_grad_norm", "0", "--warmup_steps", "0", "--save_steps", "1", "--logging_steps", "1",
                                    "--max_steps", "30")
    result = runs.launch([command], out.parent, expect_ok=False, what="exploding ZeRO-3")
    log = result.log
    assert result.returncodes != [0]
    stopped = re.search(r"asymllm train: stopped: step (\d+): the loss has been above the divergence bound 5\.545 for "
                        rf"{faults.DIVERGED_STEPS} steps in a row \(steps (\d+)-\d+:", log)
    assert stopped, log[-4000:]
    stop, first_above = int(stopped.group(1)), int(stopped.group(2))
    for rank in (0, 1):
        assert f"[asymllm rank{rank}] step {stop}: the loss" in log, f"rank {rank} did not see step {stop} above the bound"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        f"checkpoint-{s}" for s in range(1, first_above)]
    assert json.loads((out / DIVERGED_FILE).read_text())["last_good_checkpoint"] == str(out / f"checkpoint-{first_above - 1}")
    assert not (out / "adapter").exists()


# ---- fp16: a skipped step goes through the GradScaler


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_fp16_a_skipped_step_goes_through_the_grad_scaler(model_dir, tmp_path, optim):
    """--fp16 --max_bad_steps 1, the loss NaN at step 2: the scaler skips that optimizer step
    and halves its scale (as for an fp16 overflow), the run goes on and finishes; the adapter
    of step 2 is step 1's. Before, the skipped backward left the scaler no gradient to check:
    "No inf checks were recorded prior to update" (the fused AdamW, transformers' default) or
    "... for this optimizer" (the unfused one), from accelerate's optimizer step."""
    out = tmp_path / "out"
    command = [sys.executable, __file__, "--model", model_dir, "--output_dir", str(out), *runs.COMMON, "--fp16", "--optim", optim,
               "--max_bad_steps", "1", "--save_steps", "1", "--save_total_limit", "4", "--logging_steps", "1", "--max_steps", "4",
               "--warmup_steps", "0"]
    result = runs.launch([command], tmp_path, env=runs.base_env(ASYMLLM_NAN_AT_STEPS="2", ASYMLLM_NAN_RANK="0"),
                         expect_ok=False, what="fp16 with a GradScaler")
    log = result.log
    assert "No inf checks were recorded" not in log, log[-3000:]
    assert result.returncodes == [0], log[-3000:]
    assert torch.cuda.is_available() or "[grad scaler] fp16 autocast and accelerate's GradScaler on the CPU" in log
    assert "step 2: the loss is not finite on rank 0: its optimizer step is skipped (1 of at most 1, --max_bad_steps)" in log
    # the scale is halved exactly when the scaler found an inf or NaN gradient, and skipped the step
    scale = {int(step): (float(before), float(after)) for step, before, after in SCALER_LINE.findall(log)}
    assert sorted(scale) == [1, 2, 3, 4], log[-3000:]
    assert scale[2][1] == scale[2][0] / 2, scale
    taken = [s for s in (1, 3, 4) if scale[s][1] == scale[s][0]]
    assert 3 in taken or 4 in taken, scale
    tensors = {s: runs.adapter_tensors(out / f"checkpoint-{s}") for s in (1, 2, 3, 4)}
    assert runs.max_abs_diff(tensors[2], tensors[1]) == 0.0, "the skipped step changed the adapter"
    assert all(t.isfinite().all() for s in tensors for t in tensors[s].values())
    assert all(runs.max_abs_diff(tensors[s], tensors[s - 1]) > 0 for s in taken if s > 1), "a step the scaler took changed nothing"
    assert (out / "adapter").is_dir()


def _train_with_accelerates_grad_scaler_on_cpu() -> None:
    import sft_probe  # noqa: F401  (its NaN injection; it also replaces the trainer class in train.py)
    from accelerate.utils import get_grad_scaler
    from transformers import TrainerCallback

    import asymllm.training.train as train_module

    class ScalerReport(TrainerCallback):
        def __init__(self, trainer):
            self.trainer, self.before = trainer, None

        def on_step_begin(self, args, state, control, **kwargs):
            self.before = self.trainer.accelerator.scaler.get_scale()

        def on_step_end(self, args, state, control, **kwargs):
            print(f"[grad scaler] step {state.global_step}: scale {self.before:g} -> {self.trainer.accelerator.scaler.get_scale():g}",
                  flush=True)

    class GradScalerOnCPU(train_module.LorasymSFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            accelerator = self.accelerator
            if accelerator.scaler is None and self.args.fp16 and accelerator.device.type == "cpu":
                accelerator.scaler = get_grad_scaler(accelerator.distributed_type)  # what accelerate builds on a GPU
                accelerator.native_amp = True  # fp16 autocast around the forward, accelerate's own
                print("[grad scaler] fp16 autocast and accelerate's GradScaler on the CPU, as on a GPU", flush=True)
            self.add_callback(ScalerReport(self))

    train_module.LorasymSFTTrainer = GradScalerOnCPU
    train_module.main()


if __name__ == "__main__":
    _train_with_accelerates_grad_scaler_on_cpu()
