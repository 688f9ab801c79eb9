"""Small helpers for parameters that DeepSpeed ZeRO-3 has partitioned.

Under ZeRO-3 a parameter's local tensor is empty (shape `(0,)`); its true shape is
`ds_shape` and its size `ds_numel`. Gathering is a collective: every rank must enter
`GatheredParameters` with the same list, or the job hangs.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch


def is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def true_numel(param: torch.nn.Parameter) -> int:
    """Elements of the full parameter, also when ZeRO-3 keeps none of it locally."""
    return int(getattr(param, "ds_numel", param.numel()))


def true_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None):
    """Context in which the given parameters hold their full value on every rank.

    With `modifier_rank=0`, what rank 0 writes is kept and re-partitioned on exit.
    A no-op for ordinary tensors, so callers need no ZeRO-3 branch of their own.
    """
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Make `tensor` identical on every rank (rank 0's value), e.g. an SVD result."""
    _, world = rank_and_world()
    if world == 1:
        return tensor
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    wire = tensor.cuda() if torch.distributed.get_backend() == "nccl" and not tensor.is_cuda else tensor
    torch.distributed.broadcast(wire, src=0)
    return wire.to(tensor.device)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts, true under ZeRO-3 (ds_numel), shared tensors once."""
    trainable = total = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = true_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
