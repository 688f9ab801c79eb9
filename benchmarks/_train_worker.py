"""One measured training run for benchmarks/train_throughput.py (not meant to be run by hand).

    python benchmarks/_train_worker.py --variant asymllm|peer --out DIR [--deepspeed CFG] ...
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/_train_worker.py ... --deepspeed ds_configs/zero3.json

Variants (same model, data, rank, batch and SFTConfig values; see SFT_VALUES):

- asymllm: `asymllm.training.train.main(argv)`, the real entry point (`asymllm train` / launch/sft.py),
  recipe A_rand_hB_zero. Its trainer class is swapped for a subclass that adds only the
  measurement below.
- peer: plain `trl.SFTTrainer(model=AutoModelForCausalLM, peft_config=LoraConfig(...))` on
  the same tokenized dataset (asymllm.data.tokenize_examples). Under a DeepSpeed config on
  a machine without CUDA it gets the same gloo bootstrap as asymllm
  (asymllm.distributed.bootstrap_cpu_distributed + accelerator_config
  use_configured_state): a workaround for the machine, not part of what is compared.

Measurement, identical for both (the `Measured` mixin + `Timer` callback):
- loss-bearing tokens: (labels[..., 1:] != -100).sum() of every batch given to
  training_step (shifted: what the causal-LM loss counts), from step warmup+1 on;
- timed window: from on_step_end of step `warmup` to on_step_end of the last step
  (batch fetching and the trainer's logging between steps included);
- memory: the peak RSS (VmHWM) of the process up to the start of training (model load,
  adapter, DeepSpeed init), then, after resetting the high-water mark
  (/proc/self/clear_refs 5), the peak during the training steps; and the RSS at the end;
  per step, the RSS at step begin and when the model's forward returns, and the peak so far;
- where a step's time goes (`Phases`): wall seconds per step in the decoder's forward (the
  layers the adapters live in), the rest of the model's forward (the LM head and TRL's
  per-token log-probs, entropy and accuracy), backward, gradient clipping, the optimizer
  step, and the rest of the step (zero_grad, the scheduler, TRL's metrics bookkeeping,
  callbacks). A few perf_counter calls per step; both variants carry them.
Each rank writes DIR/rank{R}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPE = "A_rand_hB_zero"

# SFTConfig values given to both variants (asymllm as flags, the peer as SFTConfig kwargs).
# Explicit even where they equal a default: TRL's own defaults differ from asymllm's
# (TRL: gradient checkpointing on, bf16 on, lr 2e-5, ...).
SFT_VALUES = dict(
    gradient_accumulation_steps=1, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=5,
    logging_steps=5, save_strategy="no", eval_strategy="no", report_to="none", bf16=False, fp16=False,
    gradient_checkpointing=False, seed=42, max_length=512, dataloader_num_workers=0, packing=False,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--variant", choices=["asymllm", "peer"], required=True)
    p.add_argument("--model", required=True, help="local transformers folder")
    p.add_argument("--dataset", required=True, help="training data file (asymllm.data layouts)")
    p.add_argument("--batch", type=int, default=8, help="per-device train batch size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: leave torch's choice)")
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--quant", choices=["none", "nf4", "int8"], default="none",
                   help="the base as loaded: full precision, 4-bit NF4 (double quantization), or 8-bit (bitsandbytes)")
    p.add_argument("--extra", default="", help="more asymllm train flags, space-separated (asymllm variant only)")
    return p.parse_args(argv)


def rss_status() -> dict:
    """VmHWM (peak) and VmRSS (now) of this process, in KiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0])
    return values


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Measured:
    """Trainer mixin: counts loss-bearing tokens of the timed steps, holds the measurement."""

    bench_warmup = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bench = {"loss_tokens_timed": 0, "loss_tokens_all": 0, "step_seconds": [], "step_cpu_seconds": [],
                      "step_loss_tokens": []}
        self._step_tokens = 0
        self.add_callback(Timer(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is not None:
            n = int((labels[..., 1:] != -100).sum())
            self.bench["loss_tokens_all"] += n
            self._step_tokens += n
            if self.state.global_step >= self.bench_warmup:  # the step being run is global_step + 1
                self.bench["loss_tokens_timed"] += n
        return super().training_step(model, inputs, num_items_in_batch)


from transformers import TrainerCallback  # noqa: E402


class Timer(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.t0 = self.t1 = self.step_start = self.step_cpu_start = None
        self.phases = Phases()

    def on_train_begin(self, args, state, control, **kwargs):
        bench = self.trainer.bench
        for key in ("step_rss_begin_mib", "step_rss_forward_end_mib", "step_peak_so_far_mib"):
            bench[key] = []
        # RSS when the model's forward returns (activations held, backward not begun)
        self.trainer.model.register_forward_hook(lambda *_: self._record("step_rss_forward_end_mib", "VmRSS"))
        self.phases.install(self.trainer)
        bench["before_train"] = rss_status()
        bench["model_footprint_bytes"] = self.trainer.model.get_memory_footprint()  # weights and buffers, as held
        bench["loadavg_start_of_train"] = os.getloadavg()
        bench["peak_reset"] = reset_peak_rss()

    def on_step_begin(self, args, state, control, **kwargs):
        self.phases.begin_step(self.trainer)
        self.trainer._step_tokens = 0
        self._record("step_rss_begin_mib", "VmRSS")
        self.step_start, self.step_cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        bench = self.trainer.bench
        bench["step_seconds"].append(round(now - self.step_start, 4))
        bench["step_cpu_seconds"].append(round(time.process_time() - self.step_cpu_start, 4))
        bench["step_loss_tokens"].append(self.trainer._step_tokens)
        bench.setdefault("step_phases", []).append(self.phases.end_step(now - self.step_start))
        self._record("step_peak_so_far_mib", "VmHWM")
        if state.global_step == self.trainer.bench_warmup:
            self.t0, self.cpu0 = now, time.process_time()
        self.t1, self.cpu1 = now, time.process_time()

    def _record(self, key: str, field: str) -> None:
        if self.trainer.model.training:  # not the evaluation forwards
            self.trainer.bench[key].append(round(rss_status()[field] / 1024, 1))

    def on_train_end(self, args, state, control, **kwargs):
        from asymllm.zero import count_parameters

        bench = self.trainer.bench
        bench["during_train"] = rss_status()
        bench["timed_seconds"] = self.t1 - self.t0 if self.t0 is not None else None
        bench["timed_cpu_seconds"] = self.cpu1 - self.cpu0 if self.t0 is not None else None
        bench["loadavg_end_of_train"] = os.getloadavg()
        bench["global_step"] = state.global_step
        bench["trainable_params"], bench["total_params"] = count_parameters(self.trainer.model)
        RESULT.update(bench)


class Phases:
    """Wall seconds per training step in its parts, by hooks and wrappers on what the Trainer calls."""

    NAMES = ("decoder forward", "LM head + TRL per-token outputs", "backward", "clip grad norm", "optimizer step", "rest")

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.optimizer_wrapped = False  # the Trainer's optimizer exists by the first step, not always at train begin

    def install(self, trainer) -> None:
        model = trainer.model
        decoder = next(m for m in model.modules() if hasattr(m, "layers") and hasattr(m, "embed_tokens"))
        self._time_module(model, "forward")
        self._time_module(decoder, "decoder forward")
        trainer.accelerator.backward = self._timed(trainer.accelerator.backward, "backward")
        trainer.accelerator.clip_grad_norm_ = self._timed(trainer.accelerator.clip_grad_norm_, "clip grad norm")

    def begin_step(self, trainer) -> None:
        if not self.optimizer_wrapped:
            trainer.optimizer.step = self._timed(trainer.optimizer.step, "optimizer step")
            self.optimizer_wrapped = True
        self.seconds = {}

    def end_step(self, step_seconds: float) -> dict:
        s = dict.fromkeys(("forward", "decoder forward", "backward", "clip grad norm", "optimizer step"), 0.0) | self.seconds
        parts = {"decoder forward": s["decoder forward"], "LM head + TRL per-token outputs": s["forward"] - s["decoder forward"],
                 "backward": s["backward"], "clip grad norm": s["clip grad norm"], "optimizer step": s["optimizer step"]}
        parts["rest"] = step_seconds - sum(parts.values())
        return {k: round(v, 5) for k, v in parts.items()}

    def _add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def _timed(self, fn, name: str):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(name, time.perf_counter() - start)
        return wrapper

    def _time_module(self, module, name: str) -> None:
        starts = []
        module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        module.register_forward_hook(lambda *_: self._add(name, time.perf_counter() - starts.pop()))


RESULT: dict = {}


def sft_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def run_asymllm(args, values: dict) -> None:
    import asymllm.training.train as train_module

    class MeasuredLorasym(Measured, train_module.LorasymSFTTrainer):
        bench_warmup = args.warmup

    train_module.LorasymSFTTrainer = MeasuredLorasym
    argv = ["--recipe", RECIPE, "--lora_r", str(args.rank), "--lora_alpha", str(args.alpha), "--lora_dropout", "0",
            "--target_modules", *TARGETS, "--model", args.model, "--dataset", args.dataset,
            "--attn_implementation", "sdpa", "--output_dir", os.path.join(args.out, "run")] + sft_flags(values)
    if args.deepspeed:
        argv += ["--deepspeed", args.deepspeed]
    argv += QUANT_FLAGS[args.quant] + args.extra.split()
    train_module.main(argv)


QUANT_FLAGS = {"none": [], "nf4": ["--load_in_4bit", "--bnb_4bit_quant_type", "nf4", "--use_bnb_nested_quant"],
               "int8": ["--load_in_8bit"]}


def peer_quantization(quant: str) -> dict:
    """from_pretrained keywords a TRL + peft QLoRA user passes: the same bitsandbytes settings as asymllm's flags."""
    import torch
    from transformers import BitsAndBytesConfig

    if quant == "none":
        return {}
    config = (BitsAndBytesConfig(load_in_8bit=True) if quant == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32))
    return {"quantization_config": config, "device_map": {"": "cpu"}}


def run_peer(args, values: dict) -> None:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from asymllm.data import load_examples
    from asymllm.tokenizer import ensure_chat_template, ensure_pad_token
    from asymllm.training.tokenize import tokenize_examples
    from asymllm.distributed import bootstrap_cpu_distributed, finish_distributed

    class MeasuredSFT(Measured, SFTTrainer):
        bench_warmup = args.warmup

    # The machine workaround asymllm applies too: without CUDA, DeepSpeed needs a gloo
    # state built before the SFTConfig exists.
    bootstrapped, _ = bootstrap_cpu_distributed(bool(args.deepspeed))
    extra = {"accelerator_config": {"use_configured_state": True}} if bootstrapped else {}
    try:
        config = SFTConfig(output_dir=os.path.join(args.out, "run"), deepspeed=args.deepspeed, **values, **extra)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        ensure_chat_template(tokenizer)
        ensure_pad_token(tokenizer)
        examples, _ = load_examples(args.dataset)
        train_set, _ = tokenize_examples(examples, tokenizer, config.max_length, config.truncation_mode)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa",
                                                     **peer_quantization(args.quant))
        model.config.pad_token_id = tokenizer.pad_token_id
        lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS,
                          task_type="CAUSAL_LM")
        trainer = MeasuredSFT(model=model, args=config, train_dataset=train_set, processing_class=tokenizer,
                              peft_config=lora)
        trainer.train()
        trainer.save_model(os.path.join(args.out, "run", "adapter"))  # asymllm saves its adapter too
    finally:
        finish_distributed()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    values = dict(SFT_VALUES, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps)
    start = time.perf_counter()
    (run_asymllm if args.variant == "asymllm" else run_peer)(args, values)
    rank = int(os.environ.get("RANK", "0"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    import torch

    result = dict(RESULT, variant=args.variant, quant=args.quant, rank=rank, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                  wall_seconds=time.perf_counter() - start, at_exit=rss_status(), torch_threads=torch.get_num_threads(),
                  cpu_seconds=usage.ru_utime + usage.ru_stime, warmup=args.warmup, steps=args.steps)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
