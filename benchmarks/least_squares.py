"""Least squares with one LoRA factor frozen at random: tune only B or only A (LoRASYM, Zhu et al. 2024).

The setting of the paper's least-squares analysis (Section 4.1.1, Theorem 4.3; reconstructed
from a summary, see benchmarks/least_squares.md): a linear layer's update
Delta = W_targ - W0 (d_out x d_in) is fit by a rank-r adapter B A, with one factor frozen
at a Haar-random orthonormal matrix and the other solved exactly:

- B-only: A (r x d_in, orthonormal rows) frozen, B = argmin ||Y - X A^T B^T||  (lstsq on X A^T)
- A-only: B (d_out x r, orthonormal columns) frozen, A = argmin ||Y - X A^T B^T||  (lstsq on X)

Inputs x ~ N(0, Sigma) in R^d_in, targets y = Delta x (W0 = 0 without loss of generality,
no label noise). Delta is a random rank-r* matrix (Gaussian factors). Input settings:

- isotropic:             Sigma = I.
- rank-r inputs:         Sigma has r unit eigenvalues, the rest 0 (inputs live on r directions).
- power-law inputs:      Sigma has eigenvalues 1/i, i = 1..d_in (a decaying spectrum).
- target on weak inputs: k = r/2 strong input directions (std 100), the rest std 1, and Delta
                         reads only the weak directions (built to show when the gap reverses).

Sigma is taken diagonal: Delta (Gaussian factors) and the frozen Haar factors are rotation-
invariant, so Sigma's eigenbasis does not change the distribution of either error.
Reported: held-out relative error ||Y - X (BA)^T||^2 / ||Y||^2, mean and std over draws
(each draw: new Delta, frozen factor and samples), with the expected value
where it has a closed form (derivations in benchmarks/least_squares.md):

- A-only, every setting: 1 - r/d_out (the fit is B B^T Delta exactly when n >= d_in).
- B-only, isotropic: (1 - r/d_in) (1 + r/(n - r - 1)), the second factor being the finite-
  sample cost of fitting r features; rank-r inputs: 0; weak inputs (strong std -> inf):
  (1 - (r-k)/(d_in-k)) (1 + r/(n - r - 1)); power law: no closed form.

Run from the repository root (about 15 s on one CPU thread):

    . .venv/bin/activate
    python benchmarks/least_squares.py [--rank 8 --dims 16 32 64 128 256 --draws 20
                                        --n-train 1024 --n-test 1024 --seed 0 --threads 1]
                                       [--plot benchmarks/least_squares.png]

Prints a markdown table; --plot writes error vs d/r per setting.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asymllm.adapters.init import haar_orthonormal  # noqa: E402

SETTINGS = ("isotropic", "rank-r inputs", "power-law inputs", "target on weak inputs")
STRONG_STD = 100.0
DTYPE = torch.float64


@dataclass
class Problem:
    """One draw: the target update and the inputs' standard deviations, Sigma = diag(scales^2)."""

    delta: torch.Tensor         # d_out x d_in
    input_scales: torch.Tensor  # d_in


def haar(n: int, k: int, seed: int) -> torch.Tensor:
    return haar_orthonormal(n, k, seed).to(DTYPE)


def random_low_rank(d_out: int, d_in: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A rank-`rank` matrix with Gaussian factors: rotation-invariant on both sides."""
    left = torch.randn(d_out, rank, generator=generator, dtype=DTYPE)
    right = torch.randn(rank, d_in, generator=generator, dtype=DTYPE)
    return left @ right / math.sqrt(rank * d_in)


def make_problem(setting: str, d_in: int, d_out: int, r: int, target_rank: int, seed: int) -> Problem:
    """Sigma is diagonal: Delta (Gaussian factors) and the frozen Haar factors are rotation-
    invariant, so rotating Sigma's eigenbasis leaves the distribution of both errors unchanged."""
    generator = torch.Generator().manual_seed(seed)
    if setting == "isotropic":
        scales = torch.ones(d_in, dtype=DTYPE)
    elif setting == "rank-r inputs":
        scales = torch.cat([torch.ones(r, dtype=DTYPE), torch.zeros(d_in - r, dtype=DTYPE)])
    elif setting == "power-law inputs":
        scales = torch.arange(1, d_in + 1, dtype=DTYPE).rsqrt()  # variances 1/i
    elif setting == "target on weak inputs":
        k = r // 2
        scales = torch.cat([torch.full((k,), STRONG_STD, dtype=DTYPE), torch.ones(d_in - k, dtype=DTYPE)])
        delta = torch.zeros(d_out, d_in, dtype=DTYPE)
        delta[:, k:] = random_low_rank(d_out, d_in - k, target_rank, generator)  # reads weak inputs only
        return Problem(delta=delta, input_scales=scales)
    else:
        raise ValueError(f"unknown setting {setting!r}; one of {SETTINGS}")
    return Problem(delta=random_low_rank(d_out, d_in, target_rank, generator), input_scales=scales)


def sample(problem: Problem, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples as rows: X (n x d_in), Y = X Delta^T (n x d_out)."""
    x = torch.randn(n, problem.input_scales.shape[0], generator=generator, dtype=DTYPE) * problem.input_scales
    return x, x @ problem.delta.T


def lstsq(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least-squares solution of lhs @ sol = rhs (SVD-based: rank-deficient lhs allowed)."""
    return torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution


def fit_b_only(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """argmin_B ||Y - X A^T B^T||_F with A (r x d_in) frozen: regress Y on the r features X A^T."""
    return lstsq(x @ a.T, y).T


def fit_a_only(x: torch.Tensor, y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """argmin_A ||Y - X A^T B^T||_F with B (d_out x r, full column rank) frozen.

    Normal equations X^T X A^T B^T B = X^T Y B give A^T = X^+ Y B (B^T B)^{-1}; for an
    orthonormal B, the fitted update B A is B B^T Delta: the output projection of the target.
    """
    coefficients = torch.linalg.solve(b.T @ b, (y @ b).T).T  # Y B (B^T B)^{-1}, n x r
    return lstsq(x, coefficients).T


def relative_error(x: torch.Tensor, y: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    residual = y - x @ a.T @ b.T
    return float(residual.square().sum() / y.square().sum())


def theory(setting: str, d_in: int, d_out: int, r: int, n_train: int) -> tuple[float | None, float]:
    """Expected held-out relative error (B-only, A-only); None where there is no closed form."""
    a_only = 1.0 - r / d_out
    finite_n = 1.0 + r / (n_train - r - 1)
    if setting == "isotropic":
        return (1.0 - r / d_in) * finite_n, a_only
    if setting == "rank-r inputs":
        return 0.0, a_only
    if setting == "target on weak inputs":
        k = r // 2
        return (1.0 - (r - k) / (d_in - k)) * finite_n, a_only
    return None, a_only


def run_draw(setting: str, d_in: int, d_out: int, r: int, target_rank: int,
             n_train: int, n_test: int, seed: int) -> tuple[float, float]:
    """One draw: (B-only error, A-only error) on held-out samples."""
    problem = make_problem(setting, d_in, d_out, r, target_rank, seed)
    generator = torch.Generator().manual_seed(seed + 2)
    x_train, y_train = sample(problem, n_train, generator)
    x_test, y_test = sample(problem, n_test, generator)
    a_frozen = haar(d_in, r, seed + 3).T      # r x d_in, orthonormal rows
    b_frozen = haar(d_out, r, seed + 4)       # d_out x r, orthonormal columns
    b_fit = fit_b_only(x_train, y_train, a_frozen)
    a_fit = fit_a_only(x_train, y_train, b_frozen)
    return (relative_error(x_test, y_test, b_fit, a_frozen),
            relative_error(x_test, y_test, b_frozen, a_fit))


def draw_seed(seed: int, d: int, draw: int) -> int:
    """Distinct per (seed, d, draw); a draw uses seeds draw_seed .. draw_seed + 4."""
    if not (0 <= draw < 10_000 and 0 < d < 10_000):
        raise ValueError("draw and d must be below 10,000")
    return seed * 10**9 + d * 10**5 + draw * 10


@dataclass
class Row:
    setting: str
    d: int
    r: int
    b_only: list[float]
    a_only: list[float]
    theory_b: float | None
    theory_a: float


def run_experiment(dims: list[int], r: int, draws: int, n_train: int, n_test: int, seed: int,
                   settings: tuple[str, ...] = SETTINGS, target_rank: int | None = None) -> list[Row]:
    """Square layers d_in = d_out = d for each d in dims; `draws` seeded draws per cell."""
    target_rank = r if target_rank is None else target_rank
    rows = []
    for setting in settings:
        for d in dims:
            if n_train < d:
                raise ValueError(f"n_train={n_train} < d={d}: the A-only fit needs n >= d_in")
            errors = [run_draw(setting, d, d, r, target_rank, n_train, n_test,
                               seed=draw_seed(seed, d, draw))
                      for draw in range(draws)]
            theory_b, theory_a = theory(setting, d, d, r, n_train)
            rows.append(Row(setting, d, r, [e[0] for e in errors], [e[1] for e in errors], theory_b, theory_a))
    return rows


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {std:.4f}"


def markdown_table(rows: list[Row]) -> str:
    lines = ["| setting | d | r | d/r | B-only error (A frozen) | A-only error (B frozen) | theory B-only | theory A-only |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        theory_b = "n/a" if row.theory_b is None else f"{row.theory_b:.4f}"
        lines.append(f"| {row.setting} | {row.d} | {row.r} | {row.d // row.r} | {mean_std(row.b_only)} | "
                     f"{mean_std(row.a_only)} | {theory_b} | {row.theory_a:.4f} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(row.setting for row in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.8), sharey=True, squeeze=False)
    for ax, setting in zip(axes[0], settings):
        cells = [row for row in rows if row.setting == setting]
        ratio = [row.d / row.r for row in cells]
        for label, key, color in (("B-only (A frozen)", "b_only", "tab:blue"), ("A-only (B frozen)", "a_only", "tab:orange")):
            values = [getattr(row, key) for row in cells]
            means = [statistics.fmean(v) for v in values]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(ratio, means, yerr=stds, marker="o", capsize=3, color=color, label=label)
        ax.plot(ratio, [row.theory_a for row in cells], ls="--", color="tab:orange", alpha=0.6, label="theory A-only")
        if all(row.theory_b is not None for row in cells):
            ax.plot(ratio, [row.theory_b for row in cells], ls="--", color="tab:blue", alpha=0.6, label="theory B-only")
        ax.set_xscale("log", base=2)
        ax.set_title(setting)
        ax.set_xlabel("d / r  (d_in = d_out = d)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out relative error")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Least squares, one factor frozen at random (r={rows[0].r})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--target-rank", type=int, default=None, help="rank of Delta (default: --rank)")
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument("--n-test", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared CPU)")
    parser.add_argument("--plot", default=None, help="write the figure here (PNG)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    rows = run_experiment(args.dims, args.rank, args.draws, args.n_train, args.n_test, args.seed,
                          target_rank=args.target_rank)
    elapsed = time.perf_counter() - start
    print(f"r={args.rank}, target rank={args.target_rank or args.rank}, d_in=d_out=d, "
          f"n_train={args.n_train}, n_test={args.n_test}, draws={args.draws}, seed={args.seed}, "
          f"torch {torch.__version__}, float64; {elapsed:.1f} s\n")
    print(markdown_table(rows))
    if args.plot:
        plot(rows, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
