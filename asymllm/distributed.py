"""Start-up for distributed runs on CPU machines: the gloo process group, built before the
SFTConfig exists. With CUDA nothing is done: accelerate picks NCCL as usual.

Why it is needed on CPU: transformers builds accelerate's state with no backend there, so
- under DeepSpeed every launcher fails with `train_batch_size is not equal to
  micro_batch_per_gpu * gradient_acc_step * world_size` (measured: docs/cpu.md; docs/design.md, trap 13);
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


def restart_store_warning() -> str | None:
    """torchrun restarting its workers (--max-restarts) with its rendezvous store shared with
    them (the default of --rdzv_backend c10d) hands the restarted group the previous attempt's
    addresses: gloo's connectFullMesh then fails with "Connection refused", NCCL reads a stale
    unique id (measured here; pytorch#135712). Said at the start, before a fault needs it."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return (f"torchrun --max-restarts {restarts} shares its rendezvous store with the workers, so a restarted group would "
                "read the failed attempt's addresses and not start (pytorch#135712): set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                "in torchrun's environment (launch/slurm_sft.sbatch does)")
    return None


_CONTROL_GROUP = None


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def control_group():
    """A gloo group for the small messages ranks agree on (a stop flag, the run's settings).
    On CPU the default group is gloo already; beside NCCL a gloo side group keeps these
    messages on the host, so agreeing costs no device sync. The first call is collective:
    every rank reaches it at the same point of the run."""
    global _CONTROL_GROUP
    if _CONTROL_GROUP is None:
        world = torch.distributed.group.WORLD
        _CONTROL_GROUP = world if torch.distributed.get_backend() == "gloo" else torch.distributed.new_group(backend="gloo")
    return _CONTROL_GROUP


def gather_from_ranks(values: list[int]) -> list[list[int]]:
    """Every rank's `values` (small integers), indexed by rank; one collective, on the host."""
    if not _initialized():
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(every, mine, group=control_group())
    return [t.tolist() for t in every]


def gather_objects_from_ranks(obj) -> list:
    """Every rank's `obj` (picklable), indexed by rank."""
    if not _initialized():
        return [obj]
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, obj, group=control_group())
    return every


def barrier() -> None:
    if _initialized():
        torch.distributed.barrier(group=control_group())


def finish_distributed() -> None:
    """A barrier then teardown, so that no rank aborts on exit and fails the launcher."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
