"""TRL's SFTTrainer with the three things it gets wrong for asymmetric adapters fixed.

1. Saves: under ZeRO-3, transformers saves a PEFT model *without its frozen parameters*
   (a frozen A silently vanishes, and peft reloads a random one). Every save here goes
   through `save_adapter` (gathered, complete, read back and checked), checkpoints included.
2. Resume: the DeepSpeed checkpoint leaves frozen parameters out as well. On resume the
   frozen factors are restored from the checkpoint's (complete) adapter file.
3. What the user sees: loss-bearing tokens per second and the true trainable-parameter
   count (ds_numel under ZeRO-3) in every log line.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import SFTTrainer

from .checkpoint import ADAPTER_WEIGHTS, save_adapter
from .zero import count_parameters, gathered

logger = logging.getLogger(__name__)


class LorasymSFTTrainer(SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_tokens = 0
        self._last_log = None  # (time, tokens) at the previous log; set at the first step


    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        if self._last_log is None:
            self._last_log = (time.perf_counter(), 0.0)
        if labels is not None and model.training:
            # shifted: what the loss really counts; kept on the device (int() would sync every step)
            self._loss_tokens = self._loss_tokens + (labels[..., 1:] != -100).sum()
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Every rank enters (the gather is a collective); rank 0 writes and verifies."""
        output_dir = output_dir or self.args.output_dir
        save_adapter(self.model, output_dir)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))


class RestoreFrozenFactors(TrainerCallback):
    """On resume, put the frozen factors back exactly as the checkpoint holds them.

    The Trainer's DeepSpeed checkpoint omits frozen parameters; they were rebuilt from the
    recorded seed (or SVD) when the adapter was created, and that is checked here against
    the checkpoint's complete adapter file, which then wins.
    """

    def __init__(self, model, checkpoint_dir: str):
        self.model, self.checkpoint_dir = model, checkpoint_dir

    def on_train_begin(self, args, state, control, **kwargs):
        saved = load_file(os.path.join(self.checkpoint_dir, ADAPTER_WEIGHTS))
        frozen = {n: p for n, p in self.model.named_parameters() if "lora_" in n and not p.requires_grad}
        worst = 0.0
        with gathered(frozen.values(), modifier_rank=0), torch.no_grad():
            for name, param in frozen.items():
                value = saved[_file_key(name)]
                worst = max(worst, (param.float() - value.float().to(param.device)).abs().max().item())
                param.copy_(value.to(device=param.device, dtype=param.dtype))
        logger.info("resume: %d frozen factor tensors restored from %s (rebuilt values differed by at most %.3g)",
                    len(frozen), self.checkpoint_dir, worst)


def _file_key(param_name: str) -> str:
    """peft's file key for a parameter: the adapter name dropped ('.lora_A.default.weight' -> '.lora_A.weight')."""
    return param_name.replace(".default.", ".")


class StopAfterSteps(TrainerCallback):
    """Stop at a given step after saving a checkpoint there, as an interrupted run would leave it."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control
