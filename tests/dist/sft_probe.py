"""`launch/sft.py` with two test probes, switched on by environment variables; the
command line is exactly launch/sft.py's (launched the same ways: python, torchrun, deepspeed).

    ASYMLLM_PROBE_DIR=DIR        every rank writes DIR/rank{r}.json: what it holds locally of
                                 the base and adapter weights right after the adapter is built
                                 (base loaded by from_pretrained under ZeRO-3) and at train begin
                                 (after deepspeed.initialize partitioned the LoRA factors too),
                                 and at train end how it trained (steps, world size,
                                 accelerate's distributed type, the wrapper around the model)
    ASYMLLM_PERTURB_FROZEN=EPS   add N(0, EPS^2) noise (fixed generator, same on every rank)
                                 to every *frozen* LoRA factor, at the moment
    ASYMLLM_PERTURB_FROZEN_AT=   `build` (the default): right after the adapter is built, a
                                 frozen factor that rebuilding from the recorded seed does NOT
                                 reproduce; a resume must refuse it (a rand A rebuilds exactly).
                                 `train_begin`: after the Trainer (and DeepSpeed) loaded the
                                 checkpoint, just before asymllm restores the frozen factors; a
                                 resume must still end with the checkpoint's value.
    ASYMLLM_PAUSE_BEFORE_STEP=K  rank ASYMLLM_PAUSE_RANK (default 0), in the first attempt of a
                                 torchrun job only, waits at the beginning of step K (before its
                                 forward) until it receives a stop signal, or 120 s; it writes
                                 ASYMLLM_PAUSE_DIR/paused.json ({pid, rank, step}) first, so a test
                                 knows when, and to which process, to deliver its fault. The other
                                 ranks run on into step K and wait for it in a collective.
    ASYMLLM_NAN_AT_STEPS=3,5     rank ASYMLLM_NAN_RANK (default 1) gets NaN outputs (log-probs, logits, loss) in the training
                                 forwards of those steps: a loss that is not finite on one rank only.

Used by tests/test_train_distributed.py and tests/test_resume.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout

import asymllm.training.train as train_module  # noqa: E402
from asymllm.zero import gathered, is_partitioned, true_shape  # noqa: E402

PROBE_MODULE = "model.layers.0.self_attn.q_proj"
_info: dict = {}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _write_info() -> None:
    probe_dir = os.environ.get("ASYMLLM_PROBE_DIR")
    if probe_dir:
        os.makedirs(probe_dir, exist_ok=True)
        with open(os.path.join(probe_dir, f"rank{_rank()}.json"), "w") as f:
            json.dump(_info, f, indent=2)


def _shape_record(param: torch.nn.Parameter) -> dict:
    return {"local_shape": list(param.shape), "true_shape": list(true_shape(param)), "partitioned": is_partitioned(param)}


_original_get_lorasym_model = train_module.get_lorasym_model


def get_lorasym_model_probed(model, config, *args, **kwargs):
    base_params = dict(model.named_parameters())
    _info["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    _info["base_params"] = len(base_params)
    _info["base_params_partitioned"] = sum(is_partitioned(p) for p in base_params.values())
    _info["base_probe_weight"] = _shape_record(model.get_submodule(PROBE_MODULE).weight)
    peft_model = _original_get_lorasym_model(model, config, *args, **kwargs)
    _info["base_probe_weight_after_peft"] = _shape_record(
        peft_model.get_submodule("base_model.model." + PROBE_MODULE).base_layer.weight)
    if os.environ.get("ASYMLLM_PERTURB_FROZEN_AT", "build") == "build":
        _perturb_frozen(peft_model, "after build")
    _write_info()
    return peft_model


def _perturb_frozen(model, when: str) -> None:
    eps = float(os.environ.get("ASYMLLM_PERTURB_FROZEN", "0") or 0)
    if not eps:
        return
    frozen = [(n, p) for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad]
    generator = torch.Generator().manual_seed(20240607)
    with gathered([p for _, p in frozen], modifier_rank=0), torch.no_grad():
        for _, param in frozen:
            param.add_((eps * torch.randn(param.shape, generator=generator)).to(param.dtype))
    _info["perturbed_frozen_tensors"] = len(frozen)
    print(f"[sft_probe rank{_rank()}] perturbed {len(frozen)} frozen factor tensors by N(0, {eps}^2) {when}", flush=True)


class _ProbeAtTrainBegin(TrainerCallback):
    """Added in the Trainer's constructor: it runs before asymllm's RestoreFrozenFactors,
    which train.py adds after construction."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if os.environ.get("ASYMLLM_PERTURB_FROZEN_AT") == "train_begin":
            _perturb_frozen(model, "at train begin")
        layer = model.get_submodule("base_model.model." + PROBE_MODULE)
        _info["train_begin"] = {
            "base_weight": _shape_record(layer.base_layer.weight),
            "lora_A": _shape_record(layer.lora_A["default"].weight),
            "lora_B": _shape_record(layer.lora_B["default"].weight),
        }
        _write_info()


class _ProbeAtTrainEnd(TrainerCallback):
    """Proof that this rank took part in data-parallel training, not a run of its own."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        _info["train_end"] = {
            "global_step": state.global_step,
            "world_size": args.world_size,
            "distributed_type": str(self.trainer.accelerator.distributed_type.value),
            "model_wrapped": type(self.trainer.model_wrapped).__name__,
        }
        _write_info()


class _PauseBeforeStep(TrainerCallback):
    """Makes "a fault at step K" exact: the step a signal is agreed in is the one this rank
    was paused before (the faults themselves are the test's: real signals, real kills)."""

    def on_step_begin(self, args, state, control, **kwargs):
        step = int(os.environ.get("ASYMLLM_PAUSE_BEFORE_STEP", "0"))
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if not (step and state.global_step + 1 == step and _rank() == int(os.environ.get("ASYMLLM_PAUSE_RANK", "0"))
                and first_attempt):
            return
        pause_dir = os.environ["ASYMLLM_PAUSE_DIR"]
        os.makedirs(pause_dir, exist_ok=True)
        with open(os.path.join(pause_dir, "paused.json.tmp"), "w") as f:
            json.dump({"pid": os.getpid(), "rank": _rank(), "step": step}, f)
        os.replace(os.path.join(pause_dir, "paused.json.tmp"), os.path.join(pause_dir, "paused.json"))
        handler = signal.getsignal(signal.SIGTERM)  # asymllm's StopSignals._on_signal, bound to its flag
        flag = getattr(handler, "__self__", None)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (flag is not None and flag.received):
            time.sleep(0.05)


class _NaNOnOneRank(TrainerCallback):
    """A forward hook that poisons this rank's logits at the listed steps (training forwards only)."""

    def __init__(self):
        self.steps = {int(s) for s in os.environ.get("ASYMLLM_NAN_AT_STEPS", "").split(",") if s}
        self.step = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.steps and _rank() == int(os.environ.get("ASYMLLM_NAN_RANK", "1")):
            model.register_forward_hook(self._poison)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1

    def _poison(self, module, inputs, output):
        if module.training and self.step in self.steps:
            # TRL asks for a fused head (log_probs, no logits); a plain forward gives logits and its loss
            for name in ("log_probs", "logits", "loss"):
                if getattr(output, name, None) is not None:
                    setattr(output, name, getattr(output, name) * float("nan"))
            print(f"[sft_probe rank{_rank()}] NaN outputs at step {self.step}", flush=True)
        return output


class ProbedTrainer(train_module.LorasymSFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(_PauseBeforeStep())
        self.add_callback(_NaNOnOneRank())
        self.add_callback(_ProbeAtTrainBegin())
        self.add_callback(_ProbeAtTrainEnd(self))


train_module.get_lorasym_model = get_lorasym_model_probed
train_module.LorasymSFTTrainer = ProbedTrainer

if __name__ == "__main__":
    train_module.main()
