"""Start-up for distributed runs on CPU machines: the gloo process group, built before the
SFTConfig exists. With CUDA nothing is done: accelerate picks NCCL as usual.

Why it is needed on CPU: transformers builds accelerate's state with no backend there, so
- under DeepSpeed every launcher fails with `train_batch_size is not equal to
  micro_batch_per_gpu * gradient_acc_step * world_size` (measured, NOTES-CPU-OFFLINE.md);
- plain data parallel (torchrun, `accelerate launch --multi_gpu`, the deepspeed launcher
  without `--deepspeed`) would run each rank as an unconnected single process.

The state built here must match the run. A DeepSpeed one (ACCELERATE_USE_DEEPSPEED while
it is built) without a DeepSpeed config leaves accelerate's AcceleratorState typed
DEEPSPEED with no DeepSpeed plugin, and its `mixed_precision` property then fails
(`'AcceleratorState' object has no attribute 'mixed_precision'`). Without DeepSpeed the
state is accelerate's MULTI_CPU one (gloo), under which the Trainer wraps the model in DDP.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def launched_distributed() -> bool:
    """True under torchrun, deepspeed, accelerate launch or Slurm+srun with a world size > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def bootstrap_cpu_distributed(uses_deepspeed: bool) -> tuple[bool, str]:
    """Apply the gloo bootstrap when it is needed: (applied, a line saying what was done)."""
    if torch.cuda.is_available():
        return False, "CUDA present: distributed backend left to accelerate (NCCL)"
    if not (launched_distributed() or uses_deepspeed):
        return False, "single process on CPU"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(name, default)  # a lone `python launch/sft.py --deepspeed ...` is a world of 1
    world, rank = os.environ["WORLD_SIZE"], os.environ["RANK"]
    if uses_deepspeed:
        _deepspeed_state()
        return True, f"no CUDA: gloo process group for DeepSpeed, {world} process(es) (rank {rank})"
    _data_parallel_state()
    return True, f"no CUDA: gloo process group for data parallel (DDP), {world} processes (rank {rank})"


def _deepspeed_state() -> None:
    """DeepSpeed's own communication layer on gloo; the Trainer's DeepSpeed plugin joins it."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


def _data_parallel_state() -> None:
    """accelerate's MULTI_CPU state: `cpu=True` is what makes it multi-process (without it
    accelerate types a CPU run as a single process, even with a process group)."""
    from accelerate import PartialState

    PartialState(cpu=True, backend="gloo")


def finish_distributed() -> None:
    """A barrier then teardown, so that no rank aborts on exit and fails the launcher."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
