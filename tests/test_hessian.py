"""Hessian estimate, eigen-crossing lambda and the damped whitening factors."""

import numpy as np
import pytest

from trackstar.hessian import (autocorrelation, damped_shift, eig_factor, eigh_scaled, eigvals_desc, eigvals_desc_rows,
                               low_rank_update, mix_lambda, whiten, whitening, whitening_blocks)


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


def test_whitening_factor_inverts_the_damped_matrix():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 8))
    r = a.T @ a / 40
    damping = 0.01
    w, e = whitening(r, damping, np.float64)
    assert np.all(np.diff(e) <= 0)
    damped = r + damping * np.linalg.eigvalsh(r).mean() * np.eye(8)
    np.testing.assert_allclose(w.T @ w, np.linalg.inv(damped), rtol=1e-8)  # W^T W = R^-1: the scores of R^-1/2
    np.testing.assert_allclose(w @ damped @ w.T, np.eye(8), atol=1e-8)
    np.testing.assert_allclose(e, eigvals_desc(r, np.float64), rtol=1e-8)
    w32, _ = whitening(r, damping)  # the default float32 solver: whitening still holds to float32 accuracy
    np.testing.assert_allclose(w32 @ damped @ w32.T, np.eye(8), atol=1e-4)


def test_low_rank_update_equals_the_dense_mixed_inverse():
    # anisotropic R_train from fewer rows than d (rank-deficient, as at the default size) plus a
    # rank-30 R_eval from 30 query rows whose spectrum runs the other way: the update must equal the
    # dense inverse of the damped mix, and give the same whitened scores as the dense eigensolve
    rng = np.random.default_rng(3)
    d, nt, ne, lam, damping = 300, 200, 30, 0.3, 0.001
    spectrum = np.exp(-np.arange(d) / 40)
    t = (rng.normal(size=(nt, d)) * spectrum).astype(np.float32)
    u = (rng.normal(size=(ne, d)) * spectrum[::-1] * 3).astype(np.float32)
    r_train, r_eval = t.T.astype(np.float64) @ t / nt, u.T.astype(np.float64) @ u / ne
    r_mix = lam * r_eval + (1 - lam) * r_train
    shift = damped_shift(np.trace(r_mix), d, damping)
    assert shift == pytest.approx(damping * np.linalg.eigvalsh(r_mix).mean())
    want = np.linalg.inv(r_mix + shift * np.eye(d))
    e, v, scale = eigh_scaled(r_train, np.float64)
    w0 = eig_factor(e, v.T, scale, 1 - lam, shift)
    np.testing.assert_allclose(w0.T @ w0, np.linalg.inv((1 - lam) * r_train + shift * np.eye(d)), rtol=1e-6, atol=1e-6)
    w = low_rank_update(w0, w0 @ (np.sqrt(lam / ne) * u).T).astype(np.float64)
    assert np.linalg.norm(w.T @ w - want) / np.linalg.norm(want) < 1e-4  # float32 products
    dense, _ = whitening(r_mix, damping)
    x, y = rng.normal(size=(5, d)), rng.normal(size=(7, d))
    scores = lambda w: whiten(x, w, True) @ whiten(y, w, True).T
    np.testing.assert_allclose(scores(w), scores(dense), atol=2e-3)
    # eigenvalues of (1/n) U^T U from the n x n Gram matrix, zero past rank n
    np.testing.assert_allclose(eigvals_desc_rows(u), eigvals_desc(r_eval, np.float64), rtol=1e-4, atol=1e-9)
    assert np.all(eigvals_desc_rows(u)[ne:] == 0)


def test_block_diagonal_whitens_each_block_and_ignores_cross_terms():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(30, 6))
    r = a.T @ a / 30
    w, _ = whitening_blocks(r, [(0, 2), (2, 6)], 0.0, np.float64)
    assert np.all(w[:2, 2:] == 0) and np.all(w[2:, :2] == 0)
    np.testing.assert_allclose(w[:2, :2] @ r[:2, :2] @ w[:2, :2].T, np.eye(2), atol=1e-8)
    np.testing.assert_allclose(w[2:, 2:] @ r[2:, 2:] @ w[2:, 2:].T, np.eye(4), atol=1e-8)


def test_whiten_then_normalize():
    x = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(whiten(x, None, True), [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    w = np.diag([2.0, 1.0])
    np.testing.assert_allclose(whiten(x, w, False), [[6.0, 4.0], [0.0, 2.0]])
