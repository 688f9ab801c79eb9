"""Faults during training that every rank must handle the same way: a stop signal, a diverged loss.

Preemption and time limits. Slurm sends SIGTERM to every task on `scancel` or preemption, and
the signal of `--signal=USR1@120` before the time limit; torchrun passes SIGTERM (and, with
`--signals_to_handle ...,SIGUSR1`, SIGUSR1) on to its workers. A signal only sets a flag here.
After each micro-batch's forward, one collective on the host (`gather_from_ranks`, gloo)
tells every rank what every rank saw, so all of them stop at the end of the same step: the
Trainer saves a complete checkpoint there, and the process exits with 128 + the signal
number (143 for SIGTERM, 138 for SIGUSR1). A second signal changes nothing: a save in
progress is never cut short by us (the launcher's SIGKILL after its grace time can, and
the completion marker of checkpoints.py is what makes that harmless).

A diverged loss. The same collective carries each rank's loss. A loss that is not finite
stops the run at that step on every rank, before the backward pass, with nothing saved after
the last good checkpoint. `--max_bad_steps N` first skips N such steps: their backward pass is
not run (no rank's gradient reaches the optimizer), the optimizer step is skipped, and each
skip is logged and counted (per invocation). Under fp16 with a GradScaler the scaler is shown
an infinite gradient, so that it skips the step and lowers its scale itself (trainer.py). A
loss that stays finite but explodes stops the run the same way once the step's loss (as
logged: the ranks' mean) has been above `divergence_bound` for DIVERGED_STEPS steps in a row;
while it is above, no checkpoint is saved, so that the last good one is from before. The
check reads the loss on the host after the forward: on a GPU that is one sync per
micro-batch before the backward is queued (the Trainer already syncs on the loss after it,
for its logging_nan_inf_filter), plus the small gloo collective; not measured on a GPU here.

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
import struct
import sys

import torch
from transformers import TrainerCallback

from ..distributed import finish_distributed, gather_from_ranks
from ..zero import rank_and_world
from .checkpoints import check_complete, last_good_checkpoint

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_DIVERGED = 3  # documented in docs/distributed.md (exit codes); 1 is any other error
DIVERGED_FILE = "asymllm_diverged.json"

# The divergence bound. The loss is the mean of -ln p(the right token), so a model that guesses
# uniformly among V tokens scores ln V, and a run whose loss reaches it has lost all its base
# knew. Diverged runs need not climb far past ln V. Measured with --max_grad_norm 0 on the
# built-in SmolLM2-135M (V = 49,152, ln V = 10.80, first step 4.03): at --learning_rate 1e6 the
# loss went to 10.80 and stayed (the hidden states overflow, the final RMSNorm gives zeros,
# every logit is equal); at 1e-1 it went 16.7, 19.0, about 43, 20.7, 15.5: above 2 ln V once.
# The tiny Llama of asymllm.tiny, trained or not, goes to ln 512 = 6.238. So the bound is
# ln(V/2), within one bit per token of a uniform guess (the collapse is one bit above it), and
# far above a healthy fine-tune: the built-in default's 52 benchmark runs (lr 1e-4 to 3e-3)
# logged at most 3.3 (10-step means) against 10.1. A model that starts near ln V (an untrained
# one starts at it) would trip at once, so twice the first step's loss is the bound when that
# is higher. One step can be one unlucky batch (few loss tokens), so DIVERGED_STEPS steps in a
# row must be above it: 3 costs two steps of delay; it is not --max_bad_steps, which counts
# skipped non-finite steps and is 0 by default.
DIVERGED_STEPS = 3


def divergence_bound(vocab_size: int, first_loss: float | None = None) -> float:
    """max(ln(V/2), 2 x the first step's loss): see the comment above."""
    floor = math.log(max(vocab_size, 2) / 2)
    return max(floor, 2 * first_loss) if first_loss is not None else floor


def exit_code_for(signum: int) -> int:
    """The shell's convention for "ended by signal N", so schedulers and scripts read it as such."""
    return 128 + signum


class Diverged(RuntimeError):
    """The loss was not finite on some rank more often than --max_bad_steps allows, or above the
    divergence bound DIVERGED_STEPS steps in a row."""


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
    """What every rank learns after each training forward: who was signalled, every rank's loss."""

    def __init__(self, signals: StopSignals, max_bad_steps: int = 0, vocab_size: int | None = None):
        self.signals, self.max_bad_steps, self.vocab_size = signals, max_bad_steps, vocab_size
        self.stop_signal: int | None = None  # agreed by every rank
        self.skipped: list[int] = []          # steps whose optimizer step was skipped
        self._skip_this_step = False
        self.bound: float | None = None       # known after the first step (twice its loss may be the bound)
        self.above: list[tuple[int, float]] = []  # the latest steps in a row whose loss was above it
        self._step_loss, self._step_finite = 0.0, True

    def after_forward(self, loss: torch.Tensor, step: int) -> bool:
        """Called by every rank after each training micro-batch's forward; True: skip its backward."""
        value = loss.detach().float().sum().item()
        finite = math.isfinite(value)
        ranks = gather_from_ranks([0 if finite else 1, self.signals.received or 0, _bits(value if finite else 0.0)])
        if self.stop_signal is None:
            self.stop_signal = next((sig for _, sig, _ in ranks if sig), None)
        bad_ranks = [rank for rank, (bad, _, _) in enumerate(ranks) if bad]
        if not bad_ranks:  # the step's loss as the Trainer logs it: each rank's micro-batches summed, the ranks averaged
            self._step_loss += sum(_float(bits) for _, _, bits in ranks) / len(ranks)
            return False
        self._step_finite = False
        if step in self.skipped:  # a second bad micro-batch of an already skipped step
            return True
        where = f"step {step}: the loss is not finite on rank{'s' if len(bad_ranks) > 1 else ''} {', '.join(map(str, bad_ranks))}"
        if len(self.skipped) >= self.max_bad_steps:
            n = self.max_bad_steps
            raise Diverged(where + (f" (after {n} skipped step{'s' if n != 1 else ''}, --max_bad_steps {n})" if n else ""))
        self.skipped.append(step)
        self._skip_this_step = True
        logger.warning("%s: its optimizer step is skipped (%d of at most %d, --max_bad_steps)",
                       where, len(self.skipped), self.max_bad_steps)
        return True

    def at_optimizer_step(self, step: int) -> bool:
        """Every rank, before each optimizer step (every forward of the step done): True if a
        micro-batch of it was skipped (resets). Raises Diverged at the DIVERGED_STEPS-th step
        in a row whose loss is above the bound; the ranks agree, as they summed the same losses.
        A skipped (non-finite) step neither extends nor ends such a run of steps."""
        skip, self._skip_this_step = self._skip_this_step, False
        loss, finite = self._step_loss, self._step_finite
        self._step_loss, self._step_finite = 0.0, True
        if finite and self.vocab_size:
            self._check_bound(step, loss)
        return skip

    def describe_bound(self) -> str:
        """The log line that states the bound."""
        if not self.vocab_size:
            return "divergence bound: none (the model's vocabulary size is unknown); only a non-finite loss stops the run"
        return (f"divergence bound: a finite loss above {divergence_bound(self.vocab_size):.4g} = ln(V/2) for a vocabulary of "
                f"V = {self.vocab_size:,} (within one bit of a uniform guess, ln V = {math.log(self.vocab_size):.4g}) for "
                f"{DIVERGED_STEPS} steps in a row stops the run as a non-finite loss does (exit {EXIT_DIVERGED}); twice the "
                "first step's loss, if higher, is the bound instead")

    def _check_bound(self, step: int, loss: float) -> None:
        if self.bound is None:
            self.bound = divergence_bound(self.vocab_size, loss)
            if self.bound > divergence_bound(self.vocab_size):
                logger.info("divergence bound: %.4g, twice the first step's loss (%.4g)", self.bound, loss)
        if loss <= self.bound:
            if self.above:
                logger.warning("step %d: the loss %.4g is below the divergence bound %.4g again", step, loss, self.bound)
            self.above = []
            return
        self.above.append((step, loss))
        logger.warning("step %d: the loss %.4g is above the divergence bound %.4g (%d of %d in a row)", step, loss, self.bound,
                       len(self.above), DIVERGED_STEPS)
        if len(self.above) >= DIVERGED_STEPS:
            raise Diverged(self._where_above(step))

    def _where_above(self, step: int) -> str:
        floor = divergence_bound(self.vocab_size)
        reason = (f"ln(V/2) for a vocabulary of V = {self.vocab_size:,} (within one bit of a uniform guess, ln V = "
                  f"{math.log(self.vocab_size):.4g})" if self.bound <= floor else
                  f"twice the first step's loss ({self.bound / 2:.4g}), above ln(V/2) = {floor:.4g} for V = {self.vocab_size:,}")
        return (f"step {step}: the loss has been above the divergence bound {self.bound:.4g} for {len(self.above)} steps in a row "
                f"(steps {self.above[0][0]}-{step}: {', '.join(f'{v:.4g}' for _, v in self.above)}); the bound is {reason}")


def _bits(value: float) -> int:
    """A float as the int64 holding its bits: the host collective carries integers, this keeps the value exact."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


class StopAtAgreedSignal(TrainerCallback):
    """At the end of the step in which every rank learned of a signal: save, then stop.
    With gradient accumulation a step's earlier micro-batches still ran their backward, so the
    optimizer step drops a skipped micro-batch's contribution by dropping the whole step. Before
    each optimizer step the divergence bound is checked; no save while the loss is above it."""

    def __init__(self, guard: StepGuard):
        self.guard = guard

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.guard.at_optimizer_step(state.global_step + 1) and model is not None:
            model.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves every parameter (and its moments) as it was

    def on_step_end(self, args, state, control, **kwargs):
        if self.guard.stop_signal is not None:
            control.should_save = True
            control.should_training_stop = True
            control.should_log = args.logging_strategy != "no"  # the stop step's loss, as for a last step
            control.should_evaluate = False  # an evaluation would only delay the checkpoint the launcher waits for
        else:
            self._hold_back_save(state, control)
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.guard.stop_signal is not None:  # the loop broke off: no epoch-end evaluation or second save
            control.should_evaluate = False
            control.should_save = False
        else:
            self._hold_back_save(state, control)
        return control

    def _hold_back_save(self, state, control) -> None:
        """No checkpoint while the loss is above the divergence bound: if it stays there, the
        last good checkpoint is one from before it rose."""
        if control.should_save and self.guard.above:
            control.should_save = False
            logger.warning("step %d: checkpoint-%d not saved: the loss is above the divergence bound", state.global_step,
                           state.global_step)


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
    """Stop every rank (they all agreed on the step) naming it (`where`: Diverged's message, the
    skipped steps and the bound included) and the last good checkpoint.
    A lower --learning_rate does not apply to a resumed run: the optimizer and scheduler
    states come back with the checkpoint, so the message does not suggest it."""
    last = last_good_checkpoint(output_dir)
    if rank_and_world()[0] == 0:
        with open(os.path.join(output_dir, DIVERGED_FILE), "w") as f:
            json.dump({"where": where, "last_good_checkpoint": last}, f)
    skips = "" if max_bad_steps else "--max_bad_steps N skips steps whose loss is not finite; "
    then = (f"The last good checkpoint is {last}, left as it was: continue it with --resume_from_checkpoint auto "
            f"({skips}the learning rate comes back with its optimizer state), or start afresh with a lower "
            "--learning_rate (--overwrite_output_dir, or another --output_dir)" if last
            else "No checkpoint had been saved: start again with a lower --learning_rate (--overwrite_output_dir)")
    _say(f"asymllm train: stopped: {where}; nothing was saved after it. {then}. Exit code {EXIT_DIVERGED}.")
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
