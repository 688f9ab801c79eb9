"""Start-up for distributed runs: the gloo bootstrap that DeepSpeed needs on CPU machines.

On a machine without CUDA, transformers builds accelerate's state with no backend, and
every launcher then fails with `train_batch_size is not equal to micro_batch_per_gpu *
gradient_acc_step * world_size`. Building the state ourselves with gloo *before* the
SFTConfig exists avoids it (measured, NOTES-CPU-OFFLINE.md). With CUDA nothing is done:
accelerate picks NCCL as usual.
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
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    return True, f"no CUDA: gloo process group for {os.environ['WORLD_SIZE']} process(es) (rank {os.environ['RANK']})"


def finish_distributed() -> None:
    """A barrier then teardown, so that no rank aborts on exit and fails the launcher."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
