"""The initialisation schemes of a LoRASYM factor, as plain tensor functions.

Shapes follow peft: A is `r x d_in`, B is `d_out x r`, the pretrained weight W0 is
`d_out x d_in`. Orthonormal factors carry no singular values. Every function returns
a new float32 tensor on the device it computed on; the caller casts and copies.
"""

from __future__ import annotations

import hashlib
import math

import torch


class InitError(ValueError):
    """An init that cannot be built for this module (e.g. rank too large)."""


def module_seed(run_seed: int, module_name: str, factor: str) -> int:
    """A 63-bit seed from the run seed and the module's name: the same on every rank and
    every process, independent of module order, so a factor can be rebuilt exactly."""
    digest = hashlib.sha256(f"{run_seed}:{module_name}:{factor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_orthonormal_rank(r: int, d_out: int, d_in: int, where: str) -> None:
    if r > min(d_in, d_out):
        raise InitError(
            f"{where}: rank r={r} exceeds min(d_in={d_in}, d_out={d_out}) = {min(d_in, d_out)}; "
            "an orthonormal init (V, U, rand) needs r <= min(d_in, d_out)"
        )


def top_right_singular(weight: torch.Tensor, r: int) -> torch.Tensor:
    """`V` init of A: the top-r right singular vectors of W0 as rows, `Vh[:r]` (r x d_in)."""
    _, _, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return vh[:r].contiguous()


def top_left_singular(weight: torch.Tensor, r: int) -> torch.Tensor:
    """`U` init of B: the top-r left singular vectors of W0 as columns, `U[:, :r]` (d_out x r)."""
    u, _, _ = torch.linalg.svd(weight.float(), full_matrices=False)
    return u[:, :r].contiguous()


def haar_orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    """An `n x k` matrix (n >= k) with Haar-random orthonormal columns.

    QR of a Gaussian matrix, with the signs of R's diagonal moved into Q so that the
    distribution is exactly Haar (Mezzadri 2007), not biased by the QR convention.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    gaussian = torch.randn(n, k, generator=generator, dtype=torch.float64)
    q, r_upper = torch.linalg.qr(gaussian)
    signs = torch.sign(torch.diagonal(r_upper))
    signs[signs == 0] = 1.0
    return (q * signs).float()


def kaiming_like_peft(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """`he` init: `kaiming_uniform_(a=sqrt(5))`, what peft's default LoRA uses for A."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tensor = torch.empty(shape, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
    return tensor


def init_factor(letter: str, init: str, r: int, weight_shape: tuple[int, int], seed: int,
                weight: torch.Tensor | None = None, where: str = "module") -> torch.Tensor:
    """The initial value of factor `letter` ('A' or 'B') of one adapted module."""
    d_out, d_in = weight_shape
    shape = (r, d_in) if letter == "A" else (d_out, r)
    if init == "zero":
        return torch.zeros(shape)
    if init == "he":
        return kaiming_like_peft(shape, seed)
    check_orthonormal_rank(r, d_out, d_in, where=f"{where} ({letter} init {init!r})")
    if init == "rand":
        return haar_orthonormal(d_in, r, seed).T.contiguous() if letter == "A" else haar_orthonormal(d_out, r, seed)
    if weight is None:
        raise InitError(f"{where}: init {init!r} needs the pretrained weight")
    if init == "V" and letter == "A":
        return top_right_singular(weight, r)
    if init == "U" and letter == "B":
        return top_left_singular(weight, r)
    raise InitError(f"{where}: init {init!r} is not defined for {letter}")
