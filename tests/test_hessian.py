"""Hessian estimate, eigen-crossing lambda and the damped inverse square root."""

import numpy as np
import pytest

from trackstar.hessian import autocorrelation, eigvals_desc, inv_sqrt, inv_sqrt_blocks, mix_lambda, whiten


def test_autocorrelation_streams_to_the_dense_value():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    r, n = autocorrelation([x[:20], x[20:37], x[37:]], 6)
    assert n == 50
    np.testing.assert_allclose(r, x.T.astype(np.float64) @ x / 50, rtol=1e-5)
    # two "processes", each with its own chunks, summed by the all-reduce: the global value
    parts = [[x[:20], x[37:]], [x[20:37]]]
    partial = [autocorrelation(p, 6) for p in parts]
    total = lambda a: sum(r * n for r, n in partial) if a.shape == (6, 6) else np.array([50.0])
    r2, n2 = autocorrelation(parts[0], 6, all_reduce=total)
    assert n2 == 50
    np.testing.assert_allclose(r2, r, rtol=1e-12)


def test_lambda_makes_the_scaled_curves_cross_at_component_k():
    e_eval = np.array([100.0, 10.0, 1.0, 0.1])
    e_train = np.array([8.0, 4.0, 2.0, 1.0])
    for k in (1, 2, 3, 4):
        lam = mix_lambda(e_eval, e_train, k)
        assert lam * e_eval[k - 1] == pytest.approx((1 - lam) * e_train[k - 1])
        # before the crossing the eval curve is above, after it below
        if k > 1:
            assert lam * e_eval[0] > (1 - lam) * e_train[0]
    assert mix_lambda(e_eval, e_train, 2) == pytest.approx(4 / 14)
    with pytest.raises(ValueError, match="mix_k"):
        mix_lambda(e_eval, e_train, 5)


def test_inv_sqrt_whitens_the_damped_matrix():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 8))
    r = a.T @ a / 40
    damping = 0.01
    w, e = inv_sqrt(r, damping, np.float64)
    assert np.all(np.diff(e) <= 0)
    damped = r + damping * np.linalg.eigvalsh(r).mean() * np.eye(8)
    np.testing.assert_allclose(w @ damped @ w, np.eye(8), atol=1e-8)
    np.testing.assert_allclose(e, eigvals_desc(r, np.float64), rtol=1e-8)
    w32, _ = inv_sqrt(r, damping)  # the default float32 solver: whitening still holds to float32 accuracy
    np.testing.assert_allclose(w32 @ damped @ w32, np.eye(8), atol=1e-4)


def test_block_diagonal_whitens_each_block_and_ignores_cross_terms():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(30, 6))
    r = a.T @ a / 30
    w, _ = inv_sqrt_blocks(r, [(0, 2), (2, 6)], 0.0, np.float64)
    assert np.all(w[:2, 2:] == 0) and np.all(w[2:, :2] == 0)
    np.testing.assert_allclose(w[:2, :2] @ r[:2, :2] @ w[:2, :2], np.eye(2), atol=1e-8)
    np.testing.assert_allclose(w[2:, 2:] @ r[2:, 2:] @ w[2:, 2:], np.eye(4), atol=1e-8)


def test_whiten_then_normalize():
    x = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(whiten(x, None, True), [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    w = np.diag([2.0, 1.0])
    np.testing.assert_allclose(whiten(x, w, False), [[6.0, 4.0], [0.0, 2.0]])
