"""Hessian estimate, eigen-crossing lambda and the damped whitening factors."""

import numpy as np
import pytest

from trackstar.errors import ArtifactMismatch
from trackstar.hessian.stats import autocorrelation, autocorrelation_sums, load_stats, save_stats
from trackstar.hessian.whitening import (Whitening, eigenbasis, load_basis, load_whitening, mix_lambda, mixed_whitening,
                                         save_basis, save_whitening, spectra, train_whitening, whiten)


def test_autocorrelation_streams_to_the_dense_value():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    (r,), n = autocorrelation([x[:20], x[20:37], x[37:]], [(0, 6)])
    assert n == 50
    want = x.T.astype(np.float64) @ x.astype(np.float64) / 50  # independent float64 reference
    np.testing.assert_allclose(r, want, rtol=1e-12)
    assert np.array_equal(r, r.T)
    # two "processes", each with its own chunks, summed by the all-reduce: the global value
    parts = [[x[:20], x[37:]], [x[20:37]]]
    partial = [autocorrelation_sums(p, [(0, 6)]) for p in parts]
    total = lambda a: sum(s[0] for s, _ in partial) if a.shape == (6, 6) else np.array([50.0])
    (r2,), n2 = autocorrelation(parts[0], [(0, 6)], all_reduce=total)
    assert n2 == 50
    np.testing.assert_allclose(r2, r, rtol=1e-12)


def test_block_sums_are_the_diagonal_blocks_of_the_full_sum_and_add_over_shards():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(70, 40)) * np.linspace(0.1, 3, 40)).astype(np.float32)
    blocks = [(0, 16), (16, 17), (17, 40)]
    full = x.astype(np.float64).T @ x.astype(np.float64)  # independent reference: the full float64 sum
    sums, n = autocorrelation_sums([x[:9], x[9:50], x[50:]], blocks)
    assert n == 70 and [s.shape for s in sums] == [(16, 16), (1, 1), (23, 23)]
    for s, (a, b) in zip(sums, blocks):
        np.testing.assert_allclose(s, full[a:b, a:b], rtol=1e-12, atol=1e-12 * np.abs(full).max())
    # partial sums over disjoint row sets (corpus shards) add up to the sum over all rows
    shard_a, na = autocorrelation_sums([x[:30]], blocks)
    shard_b, nb = autocorrelation_sums([x[30:45], x[45:]], blocks)
    assert na + nb == n
    for s, a, b in zip(sums, shard_a, shard_b):
        np.testing.assert_allclose(a + b, s, rtol=1e-12)
    # a block wider than the syrk symmetrization slab (the slab copy is exercised on a small matrix)
    from trackstar.hessian.stats import _symmetrize
    m = np.tril(rng.normal(size=(9, 9)))
    _symmetrize(m, slab=4)
    np.testing.assert_array_equal(m, np.tril(m) + np.tril(m, -1).T)


def test_stats_round_trip_as_float32_blocks(tmp_path):
    rng = np.random.default_rng(2)
    r = [rng.normal(size=(5, 5)), rng.normal(size=(3, 3))]
    save_stats(tmp_path / "s.safetensors", r, {1: r[1] * 2}, {"blocks": [[0, 5], [5, 8]], "n_train": 4})
    st = load_stats(tmp_path / "s.safetensors")
    assert st.blocks == [(0, 5), (5, 8)] and st.meta["n_train"] == 4
    got = st.r_train(0)
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, r[0].astype(np.float32))
    np.testing.assert_array_equal(st.r_eval(1), (r[1] * 2).astype(np.float32))
    # a standard safetensors file
    from safetensors.numpy import load_file
    assert set(load_file(tmp_path / "s.safetensors")) == {"r_train.0", "r_train.1", "r_eval.1"}


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


def _stats(d: int, nt: int, ne: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anisotropic R_train from fewer rows than d (rank-deficient, as at the default size) and query rows
    U whose spectrum runs the other way."""
    rng = np.random.default_rng(seed)
    spectrum = np.exp(-np.arange(d) / (d / 7))
    t = (rng.normal(size=(nt, d)) * spectrum).astype(np.float32)
    u = (rng.normal(size=(ne, d)) * spectrum[::-1] * 3).astype(np.float32)
    return t.T.astype(np.float64) @ t / nt, u.T.astype(np.float64) @ u / ne, u


def _basis(r_train, r_eval, u, blocks):
    """eigenbasis over diagonal blocks of full matrices, handed over block by block as the stats file does."""
    part = lambda r: lambda i: r[blocks[i][0]:blocks[i][1], blocks[i][0]:blocks[i][1]].astype(np.float32)
    return eigenbasis(part(r_train), blocks, len(u), lambda: [u[:7], u[7:]], part(r_eval))


def _damped_inverse(r: np.ndarray, damping: float) -> np.ndarray:
    """Independent reference: (R + damping * mean eigenvalue I)^(-1) in float64."""
    return np.linalg.inv(r + damping * np.linalg.eigvalsh(r).mean() * np.eye(len(r)))


@pytest.mark.parametrize("ne", [30, 400])  # rank-30 R_eval from the rows; full-rank R_eval from its own eigensolve
def test_mixed_whitening_equals_the_dense_damped_inverse(ne):
    d, lam, damping = 300, 0.3, 0.001
    r_train, r_eval, u = _stats(d, 200, ne, 3)
    blocks = _basis(r_train, r_eval, u, [(0, d)])
    assert blocks[0].g.shape == (d, min(ne, d))
    r_mix = lam * r_eval + (1 - lam) * r_train
    mixed = mixed_whitening(blocks, lam, damping)
    w = mixed.matrix()
    want = _damped_inverse(r_mix, damping)
    assert np.linalg.norm(w.T @ w - want) / np.linalg.norm(want) < 1e-3  # float32 eigensolve and products
    # the scores TrackStar uses: whitened, normalized inner products, against a float64 symmetric root
    e, v = np.linalg.eigh(np.linalg.inv(want))
    root = (v / np.sqrt(e)) @ v.T
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, d)), rng.normal(size=(7, d))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    np.testing.assert_allclose(whiten(x, mixed, True) @ whiten(y, mixed, True).T,
                               unit(x @ root) @ unit(y @ root).T, atol=2e-3)
    # train-only whitening in the same basis
    wt = train_whitening(blocks, damping).matrix()
    want_t = _damped_inverse(r_train, damping)
    # float32 eigensolve of a rank-deficient R_train at damping 1e-3 (condition ~1e5): measured 1.6e-3
    assert np.linalg.norm(wt.T @ wt - want_t) / np.linalg.norm(want_t) < 5e-3
    # the spectra the crossing rule compares: eigenvalues of R_train and R_eval, descending, zero past rank n
    e_train, e_eval = spectra(blocks)
    np.testing.assert_allclose(e_train, np.linalg.eigvalsh(r_train)[::-1], rtol=1e-3, atol=1e-5 * e_train[0])
    np.testing.assert_allclose(e_eval, np.clip(np.linalg.eigvalsh(r_eval)[::-1], 0, None), rtol=1e-3,
                               atol=1e-5 * e_eval[0])
    if ne < d:
        assert np.all(e_eval[ne:] == 0)


def test_block_diagonal_whitens_each_block_and_ignores_cross_terms():
    d, lam, damping = 60, 0.4, 0.01
    r_train, r_eval, u = _stats(d, 80, 30, 2)  # 30 queries: the 20-wide blocks take R_eval's eigensolve, the 40-wide the rows
    blocks = _basis(r_train, r_eval, u, [(0, 20), (20, d)])
    assert [b.g.shape[1] for b in blocks] == [20, 30]
    w = mixed_whitening(blocks, lam, damping).matrix()
    assert np.all(w[:20, 20:] == 0) and np.all(w[20:, :20] == 0)
    r_mix = lam * r_eval + (1 - lam) * r_train
    for a, b in ((0, 20), (20, d)):
        want = _damped_inverse(r_mix[a:b, a:b], damping)  # each block damped by its own mean eigenvalue
        np.testing.assert_allclose(w[a:b, a:b].T @ w[a:b, a:b], want, rtol=2e-3, atol=2e-4 * np.abs(want).max())
    e_train, _ = spectra(blocks)
    want_e = np.sort(np.concatenate([np.linalg.eigvalsh(r_train[:20, :20]), np.linalg.eigvalsh(r_train[20:, 20:])]))[::-1]
    np.testing.assert_allclose(e_train, want_e, rtol=1e-3, atol=1e-5 * want_e[0])


def test_whitening_round_trips_through_its_files_and_refuses_another_basis(tmp_path):
    d = 40
    r_train, r_eval, u = _stats(d, 50, 12, 5)
    blocks = _basis(r_train, r_eval, u, [(0, d)])
    save_basis(tmp_path / "eigen.safetensors", blocks, {"basis_id": "b1"})
    loaded, meta = load_basis(tmp_path / "eigen.safetensors", vectors=False)
    assert meta == {"basis_id": "b1"} and loaded[0].vt is None
    w = mixed_whitening(loaded, 0.2, 0.001)  # computed without the eigenvectors, as the stage does
    save_whitening(tmp_path / "w_mix.safetensors", w, {"basis_id": "b1", "whitening_id": "w1"})
    back, wmeta = load_whitening(tmp_path / "w_mix.safetensors", tmp_path / "eigen.safetensors")
    assert wmeta["whitening_id"] == "w1"
    x = np.random.default_rng(0).normal(size=(3, d))
    np.testing.assert_array_equal(back.apply(x), mixed_whitening(blocks, 0.2, 0.001).apply(x))
    save_basis(tmp_path / "eigen.safetensors", blocks, {"basis_id": "b2"})
    with pytest.raises(ArtifactMismatch, match=r"w_mix.safetensors: computed from basis b1 but .*eigen.safetensors is b2"):
        load_whitening(tmp_path / "w_mix.safetensors", tmp_path / "eigen.safetensors")


def test_whiten_then_normalize():
    x = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(whiten(x, None, True), [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    w = Whitening([(0, 2)], [np.eye(2, dtype=np.float32)], [np.array([2.0, 1.0], np.float32)],
                  [np.zeros((2, 0), np.float32)], [np.zeros((2, 0), np.float32)])  # W = diag(2, 1)
    np.testing.assert_allclose(whiten(x, w, False), [[6.0, 4.0], [0.0, 2.0]])


def _ledoit_wolf_reference(x: np.ndarray) -> float:
    """Ledoit & Wolf (2004), written from the paper's definitions in float64 (x: rows): the shrinkage
    intensity rho towards mu I of S = X^T X / n, returned as the damping rho / (1 - rho)."""
    n, d = x.shape
    x = x.astype(np.float64)
    s = x.T @ x / n
    mu = np.trace(s) / d
    d2 = np.sum((s - mu * np.eye(d)) ** 2)
    b2 = sum(np.sum((np.outer(r, r) - s) ** 2) for r in x) / n ** 2
    rho = min(b2, d2) / d2
    return rho / (1 - rho)


@pytest.mark.parametrize("n, d", [(30, 80), (200, 40)])
def test_shrinkage_damping_matches_ledoit_wolf(n, d):
    from trackstar.hessian.stats import norm4_sums, shrinkage_damping
    from trackstar.hessian.whitening import block_dampings

    rng = np.random.default_rng(n)
    x = (rng.normal(size=(n, d)) * np.exp(-np.arange(d) / 10) * rng.lognormal(size=(n, 1))).astype(np.float32)
    (r,), _ = autocorrelation([x[:11], x[11:]], [(0, d)])
    norm4 = (norm4_sums(x[:11], [(0, d)]) + norm4_sums(x[11:], [(0, d)]))[0] / n  # streamed, as the stage does
    (block,) = eigenbasis(lambda i: r.astype(np.float32), [(0, d)], 3, lambda: [x[:3]], lambda i: None)
    block.norm4 = norm4
    want = _ledoit_wolf_reference(x)
    assert shrinkage_damping(block.e, block.scale, norm4, n) == pytest.approx(want, rel=2e-3)
    assert block_dampings([block], "auto", n) == [pytest.approx(want, rel=2e-3)]
    assert block_dampings([block], 0.01, n) == [0.01]
    # fewer rows, same distribution: more shrinkage
    if n > d:
        assert want < _ledoit_wolf_reference(x[: d // 2])
    block.norm4 = float("nan")
    with pytest.raises(ValueError, match="fourth moments"):
        block_dampings([block], "auto", n)
