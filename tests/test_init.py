"""The init schemes as tensor functions, including the original code's SVD slicing bug."""

import math

import pytest
import torch

from asymllm.adapters.init import InitError, haar_orthonormal, init_factor, kaiming_like_peft, module_seed


@pytest.fixture
def weight():
    return torch.randn(12, 20, generator=torch.Generator().manual_seed(0))  # d_out=12, d_in=20


def _spans_top_right_singular_subspace(weight, a) -> bool:
    """Rows of `a` are orthonormal and are W0's top right singular vectors: W0^T W0 a_i = s_i^2 a_i."""
    s = torch.linalg.svdvals(weight)[: a.shape[0]]
    if a.shape != (len(s), weight.shape[1]):
        return False
    orthonormal = torch.allclose(a @ a.T, torch.eye(len(s)), atol=1e-5)
    eigen = torch.allclose(a @ weight.T @ weight, (s**2)[:, None] * a, atol=1e-4)
    return orthonormal and eigen


def test_V_is_top_right_singular_vectors_as_rows(weight):
    a = init_factor("A", "V", 4, tuple(weight.shape), seed=0, weight=weight)
    _, _, vh = torch.linalg.svd(weight, full_matrices=False)
    assert a.shape == (4, 20)
    torch.testing.assert_close(a, vh[:4], atol=1e-6, rtol=0)
    assert _spans_top_right_singular_subspace(weight, a)
    # The check above is not vacuous: the original code's slice Vh[:, :r].T fails it, with
    # either SVD convention (full: a 4 x 20 matrix of the wrong vectors; reduced: 4 x 12).
    for full in (True, False):
        _, _, vh = torch.linalg.svd(weight, full_matrices=full)
        assert not _spans_top_right_singular_subspace(weight, vh[:, :4].T)


def test_V_slice_bug_detected_on_square_weight():
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    a = init_factor("A", "V", 4, (16, 16), seed=0, weight=w)
    _, _, vh = torch.linalg.svd(w)
    assert (a - vh[:, :4].T).abs().max() > 0.1
    # V spans the top right singular subspace: ||W a_i|| equals the i-th singular value.
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close((w @ a.T).norm(dim=0), s[:4], atol=1e-5, rtol=1e-5)


def test_U_is_top_left_singular_vectors_as_columns(weight):
    b = init_factor("B", "U", 4, tuple(weight.shape), seed=0, weight=weight)
    u, _, _ = torch.linalg.svd(weight)
    assert b.shape == (12, 4)
    torch.testing.assert_close(b, u[:, :4], atol=1e-6, rtol=0)


@pytest.mark.parametrize("letter, shape", [("A", (4, 20)), ("B", (12, 4))])
def test_rand_is_orthonormal_and_reproducible(letter, shape):
    f = init_factor(letter, "rand", 4, (12, 20), seed=5)
    assert f.shape == shape
    gram = f @ f.T if letter == "A" else f.T @ f
    torch.testing.assert_close(gram, torch.eye(4), atol=1e-6, rtol=0)
    assert torch.equal(f, init_factor(letter, "rand", 4, (12, 20), seed=5))
    assert not torch.equal(f, init_factor(letter, "rand", 4, (12, 20), seed=6))


def test_haar_has_no_sign_bias():
    # Without the sign correction, QR makes R's diagonal positive and biases Q's first column.
    first_entries = torch.stack([haar_orthonormal(3, 3, seed)[0, 0] for seed in range(400)])
    assert abs(first_entries.mean().item()) < 0.1


def test_he_matches_peft_default_bounds():
    a = kaiming_like_peft((8, 100), seed=0)
    bound = math.sqrt(6 / ((1 + 5) * 100))  # kaiming_uniform_(a=sqrt(5)) with fan_in=100
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound


def test_zero():
    assert torch.count_nonzero(init_factor("B", "zero", 4, (12, 20), seed=0)) == 0


@pytest.mark.parametrize("init", ["V", "rand"])
def test_orthonormal_rank_too_large_is_an_error(init, weight):
    with pytest.raises(InitError, match=r"r=13 exceeds min\(d_in=20, d_out=12\)"):
        init_factor("A", init, 13, tuple(weight.shape), seed=0, weight=weight, where="layers.0.q_proj")


def test_svd_init_without_weight_is_an_error():
    with pytest.raises(InitError, match="needs the pretrained weight"):
        init_factor("A", "V", 2, (4, 4), seed=0)


def test_module_seed_depends_on_run_seed_module_and_factor():
    base = module_seed(0, "model.layers.0.self_attn.q_proj", "A")
    assert base == module_seed(0, "model.layers.0.self_attn.q_proj", "A")
    assert base != module_seed(1, "model.layers.0.self_attn.q_proj", "A")
    assert base != module_seed(0, "model.layers.1.self_attn.q_proj", "A")
    assert base != module_seed(0, "model.layers.0.self_attn.q_proj", "B")
