"""Faults during training that every rank must handle the same way: a stop signal, a non-finite loss.

Preemption and time limits. Slurm sends SIGTERM to every task on `scancel` or preemption, and
the signal of `--signal=USR1@120` before the time limit; torchrun passes SIGTERM (and, with
`--signals_to_handle ...,SIGUSR1`, SIGUSR1) on to its workers. A signal only sets a flag here.
After each micro-batch's forward, one collective on the host (`gather_from_ranks`, gloo)
tells every rank what every rank saw, so all of them stop at the end of the same step: the
Trainer saves a complete checkpoint there, and the process exits with 128 + the signal
number (143 for SIGTERM, 138 for SIGUSR1). A second signal changes nothing: a save in
progress is never cut short by us (the launcher's SIGKILL after its grace time can, and
the completion marker of checkpoints.py is what makes that harmless).

A diverged loss. The same collective carries "my loss is not finite". By default the run
stops at that step on every rank, before the backward pass, with nothing saved after the
last good checkpoint. `--max_bad_steps N` first skips N such steps: their backward pass is
not run (no rank's gradient reaches the optimizer), the optimizer step is skipped, and each
skip is logged and counted (per invocation). The check reads the loss on the host after the
forward: on a GPU that is one sync per micro-batch before the backward is queued (the
Trainer already syncs on the loss after it, for its logging_nan_inf_filter), plus the small
gloo collective; not measured on a GPU here.

A diverged run leaves DIVERGED_FILE in the output folder. torchrun restarts a group on any
failed worker, so under `--max-restarts` a restarted attempt that finds it stops at once
(exit 3) instead of diverging again from the same checkpoint; a new launch (not a restart)
starts afresh and removes it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys

import torch
from transformers import TrainerCallback

from ..distributed import finish_distributed, gather_from_ranks
from ..zero import rank_and_world
from .checkpoints import check_complete, last_good_checkpoint

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_DIVERGED = 3  # documented in the README (exit codes); 1 is any other error
DIVERGED_FILE = "asymllm_diverged.json"


def exit_code_for(signum: int) -> int:
    """The shell's convention for "ended by signal N", so schedulers and scripts read it as such."""
    return 128 + signum


class Diverged(RuntimeError):
    """The loss was not finite on some rank, more often than --max_bad_steps allows."""


class StopSignals:
    """Remember the first SIGTERM/SIGUSR1; the run decides what to do at a step boundary."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            logger.warning("received %s: a complete checkpoint will be saved at the end of this step, then the run exits "
                           "(code %d)", name, exit_code_for(signum))
        else:
            logger.warning("received %s again: already stopping at the end of this step", name)


class StepGuard:
    """What every rank learns after each training forward: who was signalled, whose loss is not finite."""

    def __init__(self, signals: StopSignals, max_bad_steps: int = 0):
        self.signals, self.max_bad_steps = signals, max_bad_steps
        self.stop_signal: int | None = None  # agreed by every rank
        self.skipped: list[int] = []          # steps whose optimizer step was skipped
        self._skip_this_step = False

    def after_forward(self, loss: torch.Tensor, step: int) -> bool:
        """Called by every rank after each training micro-batch's forward; True: skip its backward."""
        finite = math.isfinite(loss.detach().float().sum().item())
        ranks = gather_from_ranks([0 if finite else 1, self.signals.received or 0])
        if self.stop_signal is None:
            self.stop_signal = next((sig for _, sig in ranks if sig), None)
        bad_ranks = [rank for rank, (bad, _) in enumerate(ranks) if bad]
        if not bad_ranks:
            return False
        if step in self.skipped:  # a second bad micro-batch of an already skipped step
            return True
        where = f"step {step}: the loss is not finite on rank{'s' if len(bad_ranks) > 1 else ''} {', '.join(map(str, bad_ranks))}"
        if len(self.skipped) >= self.max_bad_steps:
            raise Diverged(where)
        self.skipped.append(step)
        self._skip_this_step = True
        logger.warning("%s: its optimizer step is skipped (%d of at most %d, --max_bad_steps)",
                       where, len(self.skipped), self.max_bad_steps)
        return True

    def take_skip(self) -> bool:
        """At the optimizer step: was any micro-batch of this step skipped? (resets)"""
        skip, self._skip_this_step = self._skip_this_step, False
        return skip


class StopAtAgreedSignal(TrainerCallback):
    """At the end of the step in which every rank learned of a signal: save, then stop.
    With gradient accumulation a step's earlier micro-batches still ran their backward, so the
    optimizer step drops a skipped micro-batch's contribution by dropping the whole step."""

    def __init__(self, guard: StepGuard):
        self.guard = guard

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.guard.take_skip() and model is not None:
            model.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every parameter (and its moments) as it was

    def on_step_end(self, args, state, control, **kwargs):
        if self.guard.stop_signal is not None:
            control.should_save = True
            control.should_training_stop = True
            control.should_log = args.logging_strategy != "no"  # the stop step's loss, as for a last step
            control.should_evaluate = False  # an evaluation would only delay the checkpoint the launcher waits for
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.guard.stop_signal is not None:  # the loop broke off: no epoch-end evaluation or second save
            control.should_evaluate = False
            control.should_save = False
        return control


def check_not_diverged_before(output_dir: str) -> None:
    """On a torchrun restart (not a new launch): stop at once if the failed attempt diverged."""
    path = os.path.join(output_dir, DIVERGED_FILE)
    if not os.path.isfile(path):
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0:
        if rank_and_world()[0] == 0:
            os.remove(path)  # a new launch: the user chose to go on
        return
    with open(path) as f:
        where = json.load(f).get("where", "?")
    _say(f"asymllm train: not restarting: the previous attempt stopped because {where} ({path}); it would diverge "
         f"again from the same checkpoint. Exit code {EXIT_DIVERGED}.")
    raise SystemExit(EXIT_DIVERGED)


def exit_diverged(where: str, output_dir: str, max_bad_steps: int) -> None:
    """Stop every rank (they all agreed on the step) naming it and the last good checkpoint.
    A lower --learning_rate does not apply to a resumed run: the optimizer and scheduler
    states come back with the checkpoint, so the message does not suggest it."""
    last = last_good_checkpoint(output_dir)
    if rank_and_world()[0] == 0:
        with open(os.path.join(output_dir, DIVERGED_FILE), "w") as f:
            json.dump({"where": where, "last_good_checkpoint": last}, f)
    allowed = f" (after {max_bad_steps} skipped step{'s' if max_bad_steps != 1 else ''}, --max_bad_steps {max_bad_steps})"
    then = (f"The last good checkpoint is {last}, left as it was: continue it with --resume_from_checkpoint auto "
            "(--max_bad_steps N skips such steps; the learning rate comes back with its optimizer state), or start "
            "afresh with a lower --learning_rate (--overwrite_output_dir, or another --output_dir)" if last
            else "No checkpoint had been saved: start again with a lower --learning_rate (--overwrite_output_dir)")
    _say(f"asymllm train: stopped: {where}{allowed if max_bad_steps else ''}; nothing was saved after it. {then}. "
         f"Exit code {EXIT_DIVERGED}.")
    finish_distributed()
    raise SystemExit(EXIT_DIVERGED)


def exit_stopped_by_signal(signum: int, state, output_dir: str) -> None:
    """After the agreed step's checkpoint: say where it is and how to continue; exit 128 + signal."""
    code, name = exit_code_for(signum), signal.Signals(signum).name
    folder = os.path.join(output_dir, f"checkpoint-{state.global_step}")
    check_complete(folder)  # the message below promises it
    _say(f"asymllm train: stopped by {name} at step {state.global_step} of {state.max_steps}; {folder} is complete. "
         f"Exit code {code}. Continue with the same command and --resume_from_checkpoint auto")
    finish_distributed()
    raise SystemExit(code)


def _say(message: str) -> None:
    if rank_and_world()[0] == 0:
        print(message, file=sys.stderr, flush=True)
