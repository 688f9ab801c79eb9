"""benchmarks/least_squares.py at tiny sizes: the closed-form one-factor fits against gradient
descent and against the projections they must equal, and the table's theory column."""

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import torch

from asymllm.adapters.init import haar_orthonormal

REPO = Path(__file__).resolve().parents[1]
DT = torch.float64


@pytest.fixture(scope="module")
def ls():
    spec = importlib.util.spec_from_file_location("least_squares", REPO / "benchmarks" / "least_squares.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["least_squares"] = module  # dataclasses resolve string annotations through it
    threads = torch.get_num_threads()
    # Tiny LAPACK calls: a second thread only adds contention on a shared 2-core machine
    # (seconds per call there); main() below sets one thread too.
    torch.set_num_threads(1)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("least_squares", None)


def gaussian(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def loss(x, y, b, a):
    return (y - x @ a.T @ b.T).square().sum()


def gradient_descent(x, y, b, a, train, max_steps=20000, tol=1e-13):
    """Plain GD on ||Y - X A^T B^T||^2 over one factor, step 1/L (L the gradient's Lipschitz
    constant), until an update moves the factor by less than tol."""
    b, a = b.clone(), a.clone()
    if train == "B":
        features = x @ a.T
        step = 1.0 / (2 * torch.linalg.matrix_norm(features, 2) ** 2)
    else:
        step = 1.0 / (2 * torch.linalg.matrix_norm(x, 2) ** 2 * torch.linalg.matrix_norm(b, 2) ** 2)
    for _ in range(max_steps):
        residual = y - x @ a.T @ b.T  # n x d_out
        update = step * 2 * (residual.T @ (x @ a.T) if train == "B" else (residual @ b).T @ x)
        if train == "B":
            b += update
        else:
            a += update
        if update.abs().max() < tol:
            return b, a
    raise AssertionError(f"gradient descent did not converge in {max_steps} steps")


def test_b_only_closed_form_matches_gradient_descent(ls):
    x = gaussian(40, 6, seed=0) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.5, 0.2], dtype=DT)
    y = gaussian(40, 5, seed=1)  # arbitrary targets, not of the form X Delta^T
    a = haar_orthonormal(6, 2, seed=2).T.to(DT)
    b_closed = ls.fit_b_only(x, y, a)
    b_gd, _ = gradient_descent(x, y, torch.zeros(5, 2, dtype=DT), a, train="B")
    torch.testing.assert_close(b_gd, b_closed, atol=1e-8, rtol=0)
    assert loss(x, y, b_closed, a) <= loss(x, y, b_gd, a) + 1e-10


@pytest.mark.parametrize("orthonormal", [True, False])
def test_a_only_closed_form_matches_gradient_descent(ls, orthonormal):
    x = gaussian(50, 6, seed=3)
    y = gaussian(50, 5, seed=4)
    b = haar_orthonormal(5, 2, seed=5).to(DT) if orthonormal else gaussian(5, 2, seed=6) + torch.eye(5, 2, dtype=DT)
    a_closed = ls.fit_a_only(x, y, b)
    _, a_gd = gradient_descent(x, y, b, torch.zeros(2, 6, dtype=DT), train="A")
    torch.testing.assert_close(a_gd, a_closed, atol=1e-7, rtol=0)
    assert loss(x, y, b, a_closed) <= loss(x, y, b, a_gd) + 1e-10


def test_a_only_fit_is_the_output_projection(ls):
    """Noiseless targets: the A-only update B A is P_B Delta, full-rank or rank-deficient inputs."""
    for setting in ("isotropic", "rank-r inputs"):
        for seed in range(3):
            problem = ls.make_problem(setting, d_in=16, d_out=12, r=8, target_rank=8, seed=seed)
            x, y = ls.sample(problem, 64, torch.Generator().manual_seed(seed + 1))
            b = haar_orthonormal(12, 8, seed=seed + 2).to(DT)
            fitted = b @ ls.fit_a_only(x, y, b)
            projected = b @ torch.linalg.solve(b.T @ b, b.T) @ problem.delta  # B B^T Delta, up to float32 rounding
            # On the inputs' support the fitted update is the projected target. (With LAPACK's
            # gelsy the rank of the rank-deficient X came out below 8 here, and this failed.)
            torch.testing.assert_close(x @ fitted.T, x @ projected.T, atol=1e-10, rtol=0)
            if setting == "isotropic":
                torch.testing.assert_close(fitted, projected, atol=1e-10, rtol=0)


def test_b_only_fit_recovers_targets_it_can_express(ls):
    a = haar_orthonormal(12, 3, seed=10).T.to(DT)
    # A target whose row space lies in A's: Delta = M A is recovered exactly.
    m = gaussian(10, 3, seed=11)
    x = gaussian(40, 12, seed=12)
    torch.testing.assert_close(ls.fit_b_only(x, x @ (m @ a).T, a), m, atol=1e-10, rtol=0)
    # Inputs of rank <= r: any Delta is fit exactly on the inputs' support, for a random A.
    problem = ls.make_problem("rank-r inputs", d_in=12, d_out=10, r=3, target_rank=5, seed=13)
    x_train, y_train = ls.sample(problem, 40, torch.Generator().manual_seed(14))
    x_test, y_test = ls.sample(problem, 40, torch.Generator().manual_seed(15))
    assert ls.relative_error(x_test, y_test, ls.fit_b_only(x_train, y_train, a), a) < 1e-20


def test_theory_expectations_isotropic_population(ls):
    """Population (n -> inf) errors under Sigma = I, averaged over Haar factors: B-only keeps r/d_in
    of the target's energy, A-only r/d_out, whatever Delta is (here rectangular, rank 2)."""
    d_out, d_in, r, draws = 9, 14, 3, 400
    delta = gaussian(d_out, 2, seed=16) @ gaussian(2, d_in, seed=17)
    energy = delta.square().sum()
    b_only, a_only = [], []
    for i in range(draws):
        a = haar_orthonormal(d_in, r, seed=100 + i).T.to(DT)
        b = haar_orthonormal(d_out, r, seed=10_000 + i).to(DT)
        b_only.append(float((delta - delta @ a.T @ a).square().sum() / energy))
        a_only.append(float((delta - b @ b.T @ delta).square().sum() / energy))
    theory_b, theory_a = ls.theory("isotropic", d_in, d_out, r, n_train=10**9)
    assert theory_b == pytest.approx(1 - r / d_in, abs=1e-8) and theory_a == pytest.approx(1 - r / d_out)
    assert statistics.fmean(b_only) == pytest.approx(theory_b, abs=0.02)
    assert statistics.fmean(a_only) == pytest.approx(theory_a, abs=0.02)


def test_run_experiment_tiny(ls):
    rows = ls.run_experiment(dims=[8, 16], r=2, draws=30, n_train=200, n_test=200, seed=0)
    assert [(row.setting, row.d) for row in rows] == [(s, d) for s in ls.SETTINGS for d in (8, 16)]
    by = {(row.setting, row.d): row for row in rows}
    for row in rows:
        assert len(row.b_only) == len(row.a_only) == 30
        se = statistics.stdev(row.a_only) / 30**0.5
        assert abs(statistics.fmean(row.a_only) - row.theory_a) < 4 * se + 1e-3, row
        if row.theory_b is not None and row.theory_b > 0:
            se = statistics.stdev(row.b_only) / 30**0.5
            assert abs(statistics.fmean(row.b_only) - row.theory_b) < 4 * se + 0.02, row
    assert max(by["rank-r inputs", 16].b_only) < 1e-20
    assert by["power-law inputs", 16].theory_b is None
    # The asymmetry's direction: B-only wins on the decaying spectrum, loses on weak inputs.
    mean = lambda values: statistics.fmean(values)  # noqa: E731
    assert mean(by["power-law inputs", 16].b_only) < mean(by["power-law inputs", 16].a_only) - 0.05
    assert mean(by["target on weak inputs", 8].b_only) > mean(by["target on weak inputs", 8].a_only) + 0.05
    table = ls.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| power-law inputs | 16 | 2 | 8 |" in table


def test_main_prints_table_and_writes_plot(ls, tmp_path, capsys):
    png = tmp_path / "ls.png"
    assert ls.main(["--rank", "2", "--dims", "8", "--draws", "2", "--n-train", "32", "--n-test", "32",
                    "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| isotropic | 8 | 2 | 4 |" in out and png.stat().st_size > 1000
