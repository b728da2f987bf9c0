"""`hessian.damping: auto` against an independent reference: the library computes the Ledoit-Wolf shrinkage from
streamed statistics (R's eigenvalues and the rows' sum of ||g||^4), scikit-learn from the rows themselves."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf, ledoit_wolf

from trackstar.hessian.stats import norm4_sums, shrinkage_damping


def rows(n: int, d: int, seed: int) -> np.ndarray:
    """Heavy-tailed, anisotropic rows (as gradients are): the shrinkage is neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, size=(n, d)) * np.linspace(0.2, 3.0, d)).astype(np.float32)


def eta_from_streamed(x: np.ndarray, scale: float) -> float:
    """What the autocorrelation/eigen stages compute: R = (1/n) X^T X, eigenvalues of R / scale, mean ||g||^4."""
    n, d = x.shape
    x64 = x.astype(np.float64)
    e = np.linalg.eigvalsh(x64.T @ x64 / n / scale)
    return shrinkage_damping(e, scale, norm4_sums(x, [(0, d)])[0] / n, n)


@pytest.mark.parametrize("n,d,seed", [(30, 50, 0), (200, 40, 1), (64, 64, 2)])
def test_shrinkage_equals_sklearn_ledoit_wolf(n, d, seed):
    x = rows(n, d, seed)
    rho = ledoit_wolf(x.astype(np.float64), assume_centered=True)[1]
    assert 0 < rho < 1
    assert LedoitWolf(assume_centered=True).fit(x.astype(np.float64)).shrinkage_ == pytest.approx(rho, rel=1e-12)
    assert eta_from_streamed(x, scale=2.5) == pytest.approx(rho / (1 - rho), rel=1e-9)


def test_per_block_fourth_moments_give_each_blocks_shrinkage():
    x = rows(40, 60, 3)
    blocks = [(0, 25), (25, 60)]
    n4 = norm4_sums(x, blocks)
    for (a, b), s in zip(blocks, n4):
        xb = x[:, a:b].astype(np.float64)
        rho = ledoit_wolf(xb, assume_centered=True)[1]
        e = np.linalg.eigvalsh(xb.T @ xb / len(x))
        assert shrinkage_damping(e, 1.0, s / len(x), len(x)) == pytest.approx(rho / (1 - rho), rel=1e-9)
