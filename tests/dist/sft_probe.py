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

Used by tests/test_train_distributed.py and tests/test_resume.py.
"""

from __future__ import annotations

import json
import os
import sys

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


class ProbedTrainer(train_module.LorasymSFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(_ProbeAtTrainBegin())
        self.add_callback(_ProbeAtTrainEnd(self))


train_module.get_lorasym_model = get_lorasym_model_probed
train_module.LorasymSFTTrainer = ProbedTrainer

if __name__ == "__main__":
    train_module.main()
