#!/usr/bin/env bash
# GPU check (issue 3): the built-in default (SmolLM2-135M-Instruct + built-in data,
# A_rand_hB_zero r=16, asymllm's defaults) trained for a short run on the GPU(s) with
# flash attention (flash_attention_2 when flash-attn is installed, else sdpa), bf16 and
# DeepSpeed ZeRO-3; prints loss-bearing tokens/s and peak GPU memory.
#
#   bash benchmarks/gpu_check.sh                      # 40 steps, 1 GPU
#   NGPU=8 MAX_STEPS=60 bash benchmarks/gpu_check.sh --per_device_train_batch_size 16
#
# Needs an environment with CUDA torch and asymllm's dependencies (.venv from
# `bash .ci/install.sh` on a GPU machine; it is used when present, else the python on
# PATH). Extra arguments go to `asymllm train` and win over the ones below.
# Measured as benchmarks/train_throughput.py measures: loss-bearing tokens (labels !=
# -100 after the causal shift, all ranks) of the steps after WARMUP, over the wall time
# from the end of step WARMUP to the end of the last step (CUDA synchronised at each step
# end); peak memory = torch.cuda.max_memory_allocated / max_memory_reserved over the
# training steps (max over ranks). asymllm's own loss_tokens_per_s log values are printed
# beside it as a cross-check.
# GPU_CHECK_CPU_DRY_RUN=1 exercises the plumbing on a CPU machine (fp32, 2 steps' worth of
# numbers that say nothing about GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."

NGPU=${NGPU:-1}
MAX_STEPS=${MAX_STEPS:-40}
WARMUP=${WARMUP:-5}
OUT_DIR=${OUT_DIR:-outputs/gpu_check}
DRY=${GPU_CHECK_CPU_DRY_RUN:-0}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi

echo "== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $PY"
command -v nvidia-smi >/dev/null && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; }

ATTN=$(GPU_CHECK_CPU_DRY_RUN=$DRY "$PY" - <<'PYEOF'
import os, sys
import torch
if os.environ["GPU_CHECK_CPU_DRY_RUN"] == "1":
    print("sdpa")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch.cuda.is_available() is False (torch {torch.__version__}): "
             "a CUDA build of torch and a GPU are needed")
if not torch.cuda.is_bf16_supported():
    sys.exit("gpu_check: this GPU does not support bf16")
try:
    import flash_attn  # noqa: F401
    print("flash_attention_2")
except ImportError:
    print("sdpa")
PYEOF
)
PRECISION=(--bf16 true)
if [ "$DRY" = 1 ]; then
  echo "note: GPU_CHECK_CPU_DRY_RUN=1: a CPU plumbing check in fp32; no GPU figures"
  PRECISION=(--bf16 false --activation_checkpointing false)
elif [ "$ATTN" = sdpa ]; then
  echo "note: flash-attn is not installed (pip install 'asymllm[gpu]'), so sdpa: PyTorch runs its flash kernel"
  echo "      where no attention mask is needed; padded batches may get its memory-efficient kernel instead."
fi
"$PY" -c "import deepspeed, torch; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}')"

WRAPPER=$(mktemp --suffix=_gpu_check.py)
trap 'rm -f "$WRAPPER"' EXIT
cat > "$WRAPPER" <<'PYEOF'
"""asymllm.training.train.main with a measuring trainer: loss tokens/s and peak CUDA memory of the timed steps."""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import torch
from transformers import TrainerCallback
import asymllm.training.train as train_module

WARMUP = int(os.environ["GPU_CHECK_WARMUP"])
RESULT_FILE = os.environ["GPU_CHECK_RESULT"]
CUDA = torch.cuda.is_available()


class Probe(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.t0, self.t1 = trainer, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        if CUDA:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if state.global_step == WARMUP:
            self.t0 = now
        self.t1 = now

    def on_train_end(self, args, state, control, **kwargs):
        t = self.trainer
        memory = [float(torch.cuda.max_memory_allocated()), float(torch.cuda.max_memory_reserved())] if CUDA else [0.0, 0.0]
        device = "cuda" if CUDA else "cpu"
        tokens = torch.tensor([float(t.gpu_check_tokens)], device=device, dtype=torch.float64)
        peaks = torch.tensor(memory, device=device, dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(tokens)
            torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
        if not args.should_save:  # rank 0 writes
            return
        seconds = (self.t1 - self.t0) if self.t0 is not None else float("nan")
        model = t.model.get_base_model() if hasattr(t.model, "get_base_model") else t.model
        try:
            stage = args.hf_deepspeed_config.config["zero_optimization"]["stage"]
        except (AttributeError, KeyError, TypeError):
            stage = None
        result = {
            "gpu": torch.cuda.get_device_name(0) if CUDA else "none (CPU dry run)", "world_size": args.world_size,
            "attention": getattr(model.config, "_attn_implementation", "?"), "bf16": args.bf16, "zero_stage": stage,
            "gradient_checkpointing": args.activation_checkpointing,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "steps": state.global_step, "timed_steps": state.global_step - WARMUP, "timed_seconds": seconds,
            "loss_tokens_timed": int(tokens.item()), "loss_tokens_per_s": tokens.item() / seconds,
            "asymllm_logged_loss_tokens_per_s": [h["loss_tokens_per_s"] for h in state.log_history if "loss_tokens_per_s" in h],
            "max_memory_allocated_gib": peaks[0].item() / 2**30, "max_memory_reserved_gib": peaks[1].item() / 2**30,
        }
        with open(RESULT_FILE, "w") as f:
            json.dump(result, f, indent=1)


class Measured(train_module.LorasymSFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gpu_check_tokens = 0
        self.add_callback(Probe(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        labels = inputs.get("labels")
        if labels is not None and self.state.global_step >= WARMUP:  # the step being run is global_step + 1
            self.gpu_check_tokens += int((labels[..., 1:] != -100).sum())
        return super().training_step(model, inputs, num_items_in_batch)


train_module.LorasymSFTTrainer = Measured
train_module.main(sys.argv[1:])
PYEOF

RESULT="$OUT_DIR/gpu_check.json"
mkdir -p "$OUT_DIR"
rm -f "$RESULT"
echo "== training: $NGPU process(es), ZeRO-3, ${PRECISION[*]}, attention $ATTN, $MAX_STEPS steps ($WARMUP untimed)"
run=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" "$WRAPPER"
     --deepspeed ds_configs/zero3.json "${PRECISION[@]}" --attn_implementation "$ATTN" --max_steps "$MAX_STEPS"
     --logging_steps 5 --save_strategy no --output_dir "$OUT_DIR/run" --overwrite_output_dir "$@")
echo "+ ${run[*]}"
status=0
GPU_CHECK_WARMUP=$WARMUP GPU_CHECK_RESULT=$RESULT TOKENIZERS_PARALLELISM=false "${run[@]}" 2>&1 \
  | tee "$OUT_DIR/train.log" || status=$?
if [ "$status" != 0 ] || [ ! -f "$RESULT" ]; then
  echo "gpu_check: FAILED (exit status $status; log in $OUT_DIR/train.log)"
  exit 1
fi

"$PY" - "$RESULT" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
logged = ", ".join(f"{x:g}" for x in r["asymllm_logged_loss_tokens_per_s"]) or "none"
print(f"""
================ gpu_check result ================
GPU:              {r['gpu']} x {r['world_size']}
setup:            ZeRO stage {r['zero_stage']}, bf16 {r['bf16']}, attention {r['attention']}, gradient checkpointing {r['gradient_checkpointing']}, batch {r['per_device_train_batch_size']} per GPU
steps:            {r['steps']} ({r['timed_steps']} timed, {r['timed_seconds']:.2f} s)
loss tokens/s:    {r['loss_tokens_per_s']:.1f}  ({r['loss_tokens_timed']} loss-bearing tokens in the timed steps)
asymllm logs:     loss_tokens_per_s {logged}
peak GPU memory:  {r['max_memory_allocated_gib']:.2f} GiB allocated, {r['max_memory_reserved_gib']:.2f} GiB reserved (torch.cuda, training steps, max over ranks)
==================================================""")
PYEOF
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp "$RESULT" "$OUT_DIR/train.log" "$OUT/"; fi

# issue 29: activation memory of one step on the GPU, asym vs peft LoRA (torch.cuda.max_memory_allocated)
if [ "$DRY" != 1 ] && [ "${ACTIVATION_MEMORY:-1}" = 1 ]; then
  echo "== activation memory (benchmarks/activation_memory.py --device cuda; ACTIVATION_MEMORY=0 skips it)"
  "$PY" benchmarks/activation_memory.py --device cuda --lengths 1024,2048
fi

# issue 29: one training step, fused frozen-A path vs peft's forward vs peft LoRA, on the GPU under bf16 autocast
if [ "$DRY" != 1 ] && [ "${ADAPTER_STEP:-1}" = 1 ]; then
  echo "== adapter step (benchmarks/adapter_step.py --device cuda --autocast; ADAPTER_STEP=0 skips it)"
  "$PY" benchmarks/adapter_step.py --device cuda --autocast --steps 50 --warmup 5
fi
