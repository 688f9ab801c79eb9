"""bf16 autocast on CPUs that have bf16 matrix units (AMX-bf16, AVX512-bf16), fp32 master weights.

transformers allows `--bf16` only on GPUs, and on a GPU it means bf16 weights; on a CPU with
bf16 units the safe form is autocast: the model and optimizer stay fp32, matmuls run in bf16.
It is opt-in (`--cpu_autocast_bf16 true`), because it was measured not to pay: on the 2-core
AMX machine the default run took 0.977x the wall time of fp32 (benchmarks/cpu_bf16.py,
benchmarks/RESULTS.md "cpu_bf16"), far from the 0.5x that would justify changing the numerics
by default. Where a CPU reports bf16 units the log says so and names the flag.
"""

from __future__ import annotations

import contextlib

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names, fastest first


def cpu_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The first of BF16_CPU_FLAGS this CPU reports, or None (also where /proc/cpuinfo is absent)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)


def choose_cpu_autocast(asked: bool | None, units: str | None, cuda: bool) -> tuple[bool, str]:
    """(autocast on?, the log line saying what was chosen and how to change it).
    `asked`: --cpu_autocast_bf16 as given (None: not given: fp32)."""
    if cuda:
        if asked:
            raise ValueError("--cpu_autocast_bf16 true: this machine has a GPU; use --bf16 true there")
        return False, ""
    if asked is True:
        if units is None:
            raise ValueError("--cpu_autocast_bf16 true: this CPU reports no bf16 units (amx_bf16 or avx512_bf16); "
                             "pass --cpu_autocast_bf16 false")
        return True, f"precision: bf16 autocast on CPU ({units}), fp32 master weights (--cpu_autocast_bf16 true)"
    if asked is False:
        return False, "precision: fp32 (--cpu_autocast_bf16 false)"
    if units is None:
        return False, "precision: fp32 (this CPU reports no bf16 units)"
    return False, (f"precision: fp32; the CPU reports {units}: --cpu_autocast_bf16 true for bf16 autocast (measured "
                   "0.98x the wall time of fp32 on the default run: benchmarks/RESULTS.md, cpu_bf16)")


def cpu_autocast(enabled: bool, cache_enabled: bool | None = True) -> contextlib.AbstractContextManager:
    """The context every forward of training and evaluation runs in."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache_enabled)
