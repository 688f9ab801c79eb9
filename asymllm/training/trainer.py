"""TRL's SFTTrainer with what it gets wrong for asymmetric adapters and cluster jobs fixed.

1. Saves: under ZeRO-3, transformers saves a PEFT model *without its frozen parameters*
   (a frozen A silently vanishes, and peft reloads a random one). Every save here goes
   through `save_adapter` (gathered, complete, read back and checked), checkpoints included.
2. Resume: the DeepSpeed checkpoint leaves frozen parameters out as well. On resume the
   frozen factors are restored from the checkpoint's (complete) adapter file, after checking
   that the checkpoint was made with this run's recipe, seed and adapter shape, and that
   the frozen factors rebuilt here agree with it.
3. What the user sees: loss-bearing tokens per second and the true trainable-parameter
   count (ds_numel under ZeRO-3) in every log line; the last step always logged; plain
   progress lines when the bars are off (stderr not a terminal); and asymllm's model card
   in place of TRL's, which names no base model when it was loaded from a folder.
4. Faults: every checkpoint gets its completion marker once every rank has written its part
   (training/checkpoints.py); a stop signal, or a loss that is not finite or above the
   divergence bound, is agreed by all ranks after each forward, and handled the same way on
   each (training/faults.py); under fp16 a skipped step goes through the GradScaler.
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch
from safetensors.torch import load_file
from transformers import PrinterCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTTrainer

from ..adapters.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_file_key, save_adapter, verify_adapter_dir
from ..adapters.recipe import Recipe
from ..adapters.recipe_file import RECIPE_FILE, read_recipe_file
from ..distributed import barrier
from ..zero import count_parameters, gathered
from .checkpoints import (StaleCheckpoint, clear_for_save, comparable, recorded_training_settings, setting_differences,
                          stale_message, write_marker)
from .config import ConfigError
from .faults import StepGuard, StopAtAgreedSignal, StopSignals
from .precision import cpu_autocast
from .report import write_run_card

logger = logging.getLogger(__name__)


class LorasymSFTTrainer(SFTTrainer):
    def __init__(self, *args, guard: StepGuard | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._undo_trl_bf16_cast_on_quantized_bases()
        self._loss_tokens = 0
        self._last_log = None  # (time, tokens) at the previous log; set at the first step
        self.guard = guard or StepGuard(StopSignals())  # signals not installed: stops only on a diverged loss
        if self.guard.vocab_size is None:
            self.guard.vocab_size = _vocab_size(self.model)
        logger.info(self.guard.describe_bound())
        self._guard_backward()
        self.add_callback(LogLastStep)
        self.add_callback(StopAtAgreedSignal(self.guard))
        if self.args.disable_tqdm:  # PrinterCallback's raw dicts give neither the step count nor the time left
            self.remove_callback(PrinterCallback)
            self.add_callback(PlainProgress)

    def _undo_trl_bf16_cast_on_quantized_bases(self) -> None:
        """On a 4/8-bit base TRL casts every *trainable* adapter weight to bf16 (the QLoRA paper's
        advice), whatever the run computes in: on a CPU in fp32 the first forward then fails
        (float input, bf16 B), and a frozen A stays fp32 beside a bf16 B. Every adapter factor here
        takes the run's dtype instead: fp32, or bf16 / fp16 with --bf16 / --fp16."""
        model = self.model
        if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
            return
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else torch.float32
        for name, param in model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and param.dtype != dtype:
                param.data = param.data.to(dtype)
        logger.info("quantized base: every adapter factor in %s (TRL would cast the trained ones to bf16)",
                    str(dtype).removeprefix("torch."))

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        """bf16 autocast on CPUs with bf16 units (training/precision.py); transformers' own otherwise."""
        if getattr(self.args, "cpu_autocast_bf16", False):
            return cpu_autocast(True, cache_enabled)
        return super().autocast_smart_context_manager(cache_enabled)

    def _guard_backward(self) -> None:
        """The Trainer's training_step runs the forward and then accelerator.backward, and under
        DeepSpeed the optimizer step happens inside that backward. Here, between the two, every
        rank learns what every rank saw (training/faults.py), and a micro-batch with a non-finite
        loss is kept out of both by not running it (every rank agreed to skip). The loss handed
        to backward is the one training_step returns and the Trainer logs (scaled for gradient
        accumulation), so the divergence bound is checked on the logged loss."""
        backward = self.accelerator.backward

        def guarded_backward(loss, **kwargs):
            if not self.guard.after_forward(loss, self.state.global_step + 1):
                return backward(loss, **kwargs)
            self._let_the_grad_scaler_skip()
        self.accelerator.backward = guarded_backward

    def _let_the_grad_scaler_skip(self) -> None:
        """fp16 with accelerate's GradScaler (on a GPU; DeepSpeed's own scaler never sees a
        skipped step): the scaler steps the optimizer only once it has checked the gradients
        for inf/NaN, and asserts "No inf checks were recorded" when a skipped backward left it
        none. An infinite gradient makes it skip the step and lower its scale itself, as for an
        fp16 overflow (the fused AdamW is handed the scaler's found-inf and makes the step a no-op)."""
        if getattr(self.accelerator, "scaler", None) is None:
            return
        param = next(p for p in self.model.parameters() if p.requires_grad)
        param.grad = torch.full_like(param, float("inf"))  # the step is dropped whole: its other gradients too

    def save_stop_checkpoint(self) -> None:
        """After a stop signal: the step's checkpoint, unless the loop saved it (save_strategy
        `best` may decline to save on an evaluation step). Every rank calls it."""
        if getattr(self, "_saved_at_step", None) != self.state.global_step:
            self._save_checkpoint(self.model_wrapped, trial=None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if self._last_log is None:
            self._last_log = (time.perf_counter(), 0.0)
        if labels is not None and model.training:
            # shifted: what the loss really counts; kept on the device (int() would sync every step)
            self._loss_tokens = self._loss_tokens + (labels[..., 1:] != -100).sum()
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then its completion marker (written last, by rank 0, once
        every rank has written its files), then the rotation of old checkpoints: rotating
        first could delete the last complete checkpoint while the new one is still unmarked."""
        if getattr(self, "_saved_at_step", None) == self.state.global_step:
            return  # a stop's save then the epoch end's at the same step: once is complete
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            clear_for_save(folder)
        barrier()
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        barrier()
        self._saved_at_step = self.state.global_step
        if self.args.should_save:
            write_marker(folder, self.state.global_step)
            rotate_checkpoints(output_dir=os.path.dirname(folder), save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # a training log line, reached by every rank at the same step
            logs["loss_tokens_per_s"] = round(self._loss_tokens_per_second(), 1)
            logs["trainable_params"] = count_parameters(self.model)[0]
        super().log(logs, *args, **kwargs)

    def _loss_tokens_per_second(self) -> float:
        tokens = torch.as_tensor(self._loss_tokens, dtype=torch.float64).to(self.args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(tokens)
        now, before = time.perf_counter(), self._last_log
        total = float(tokens)
        rate = (total - before[1]) / max(now - before[0], 1e-9)
        self._last_log = (now, total)
        return rate

    def create_model_card(self, *args, **kwargs) -> None:
        """TRL's card (written at every checkpoint) reads the base model from the config, which
        for a local folder says None; asymllm's names the base, recipe, rank and data, or is
        not written (a Trainer used outside `asymllm train` has no run record to take them from)."""
        if self.is_world_process_zero():
            write_run_card(self.args.output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False, frozen_as: str = "tensor") -> None:
        """Every rank enters (the gather is a collective); rank 0 writes and verifies."""
        output_dir = output_dir or self.args.output_dir
        save_adapter(self.model, output_dir, frozen_as=frozen_as)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))


def _vocab_size(model) -> int | None:
    """The number of logits the loss is taken over (the divergence bound's V)."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "vocab_size", None)


def checkpoint_settings(checkpoint_dir: str) -> dict:
    """What a checkpoint was made with, keyed by the flag that sets it: recipe and seed from
    its lorasym.json, the adapter's shape from its adapter_config.json."""
    verify_adapter_dir(checkpoint_dir)
    try:
        record = read_recipe_file(checkpoint_dir)
    except ValueError as error:
        raise ConfigError(f"--resume_from_checkpoint {checkpoint_dir}: {error}") from None
    if record is None:
        raise ConfigError(f"--resume_from_checkpoint {checkpoint_dir}: no {RECIPE_FILE}, so the recipe and seed it was "
                          "made with are unknown; resume only from a checkpoint asymllm wrote")
    recipe, seed = record
    with open(os.path.join(checkpoint_dir, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    return {"--recipe": recipe.name, "--seed": seed, "--lora_r": config.get("r"), "--lora_alpha": config.get("lora_alpha"),
            "--use_rslora": bool(config.get("use_rslora", False)), "--target_modules": config.get("target_modules")}


def check_checkpoint_settings(checkpoint_dir: str, settings: dict, training: dict | None = None) -> None:
    """Refuse (StaleCheckpoint) to continue a checkpoint made with other settings: the run would
    go on with the checkpoint's factors, optimizer, schedule and data position while recording
    this run's settings. `settings`: flag -> this run's value (None: not known yet), compared with
    the checkpoint's adapter files; `training`: this run's training settings (run_record.py),
    compared with those its marker records (a checkpoint from before they were recorded: a warning).
    From files and flags alone, so every rank decides the same."""
    made_with = checkpoint_settings(checkpoint_dir)
    differ = {flag: (made_with[flag], value) for flag, value in settings.items()
              if value is not None and comparable(made_with[flag]) != comparable(value)}
    if training is not None:
        recorded = recorded_training_settings(checkpoint_dir)
        if recorded is None:
            logger.warning("--resume_from_checkpoint %s: the checkpoint records no training settings (made by an earlier "
                           "asymllm), so they could not be checked; only its recipe, seed and adapter shape were", checkpoint_dir)
        for flag, pair in setting_differences(recorded or {}, training).items():
            differ.setdefault(flag, pair)
    if differ:
        raise StaleCheckpoint(stale_message(checkpoint_dir, differ))


# Inits a rebuild reproduces bit for bit: seeded CPU generators, or zeros. An SVD (V, U) is
# only as reproducible as its kernel (threads, BLAS, device), so there a difference is reported.
EXACT_INITS = ("rand", "he", "zero")


class RestoreFrozenFactors(TrainerCallback):
    """On resume, put the frozen factors back exactly as the checkpoint holds them.

    The Trainer's DeepSpeed checkpoint omits frozen parameters; they were rebuilt from the
    recorded seed (or SVD) when the adapter was created. They are compared with the
    checkpoint's complete adapter file here, at construction, before `trainer.train` loads
    anything (afterwards a single-process run would compare the file with itself), and the
    file's values are copied in at train begin, after every load.
    """

    def __init__(self, model, checkpoint_dir: str, recipe: Recipe):
        self.model, self.checkpoint_dir = model, checkpoint_dir
        saved = load_file(os.path.join(checkpoint_dir, ADAPTER_WEIGHTS))
        frozen = {n: p for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad}
        self.saved = {name: saved[peft_file_key(name)] for name in frozen}
        self.worst = _check_rebuilt_factors(frozen, self.saved, recipe, getattr(model, "lorasym_seed", None), checkpoint_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        # looked up again: the parameters as they are now, after DeepSpeed's initialize
        frozen = {n: p for n, p in self.model.named_parameters() if n in self.saved}
        with gathered(frozen.values(), modifier_rank=0), torch.no_grad():
            for name, param in frozen.items():
                param.copy_(self.saved[name].to(device=param.device, dtype=param.dtype))
        logger.info("resume: %d frozen factor tensors restored from %s (rebuilt values differed by at most %.3g)",
                    len(frozen), self.checkpoint_dir, self.worst)


def _check_rebuilt_factors(frozen: dict, saved: dict, recipe: Recipe, seed, checkpoint_dir: str) -> float:
    """The largest |rebuilt - checkpoint| over the frozen factors. For rand/he/zero any
    difference is an error (the checkpoint was not made with this recipe and seed, or by
    another asymllm); for V/U it is reported. Every rank computes the same, so all stop together."""
    worst = {"A": 0.0, "B": 0.0}
    with gathered(frozen.values(), modifier_rank=None), torch.no_grad():
        for name, param in frozen.items():
            letter, module = ("A" if ".lora_A." in name else "B"), _module_name(name)
            value = saved[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ConfigError(f"--resume_from_checkpoint {checkpoint_dir}: {module}'s {letter} is {tuple(value.shape)} in "
                                  f"the checkpoint, {tuple(param.shape)} in this run")
            # in the checkpoint's dtype: ZeRO-1/2 with bf16/fp16 casts every parameter, the frozen
            # factors too, so their file holds the rounded values a rebuild must round to as well
            diff = (param.to(value.dtype).float() - value.float().to(param.device)).abs().max().item()
            init = getattr(recipe, letter).init
            if diff > 0 and init in EXACT_INITS:
                raise ConfigError(
                    f"--resume_from_checkpoint {checkpoint_dir}: the frozen {letter} of {module} ({init} init, seed {seed}) "
                    f"rebuilt here differs from the checkpoint's by up to {diff:.3g}, and a {init} init rebuilds exactly; "
                    "the checkpoint was made with another seed or recipe, by another asymllm version, or its adapter file was changed")
            worst[letter] = max(worst[letter], diff)
    for letter in ("A", "B"):
        init = getattr(recipe, letter).init
        if not getattr(recipe, letter).trainable and init not in EXACT_INITS:
            logger.info("resume: the frozen %s (%s init, an SVD of the base weights) rebuilt here differs from the checkpoint's "
                        "by at most %.3g; training continues with the checkpoint's values", letter, init, worst[letter])
    return max(worst.values())


def _module_name(param_name: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight' -> 'model.layers.0.self_attn.q_proj'."""
    return param_name.split(".lora_")[0].removeprefix("base_model.model.")


class LogLastStep(TrainerCallback):
    """Log the last step's loss even when it falls between two logging_steps: a run shorter
    than the interval would otherwise log no loss at all (and draw no loss curve)."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.logging_strategy != "no" and (state.global_step >= state.max_steps or control.should_training_stop):
            control.should_log = True
        return control


class PlainProgress(TrainerCallback):
    """With the progress bars off, one plain line per log, as the bar would have shown it:
    `step 40/500 (8%) | epoch 0.16 | loss 2.314 | ... | elapsed 0:01:02 | eta 0:11:53`."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = time.perf_counter(), state.global_step  # a resumed run starts past 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            logger.info(progress_line(state.global_step, state.max_steps, logs, *self._timing(state.global_step, state.max_steps)))

    def _timing(self, step: int, max_steps: int) -> tuple[float | None, float | None]:
        if not hasattr(self, "start"):
            return None, None  # an evaluate() outside training
        elapsed = time.perf_counter() - self.start
        done = step - self.first_step
        return elapsed, (elapsed / done * (max_steps - step) if done > 0 else None)


def progress_line(step: int, max_steps: int, logs: dict, elapsed: float | None, eta: float | None) -> str:
    shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items() if k != "total_flos"]
    timing = [f"elapsed {_clock(elapsed)}" if elapsed is not None else None,
              f"eta {_clock(eta)}" if eta is not None and step < max_steps else None]
    head = f"step {step}/{max_steps} ({100 * step / max(max_steps, 1):.0f}%)"
    return " | ".join([head, *shown, *filter(None, timing)])


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StopAfterSteps(TrainerCallback):
    """Stop at a given step after saving a checkpoint there, as an interrupted run would leave it."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control
