"""Gauss-Newton Hessian estimates and the whitening R^(-1/2) (DESIGN §2 step 4).

R = (1/N) sum g g^T over projected, corrected gradients, streamed chunk by chunk. TrackStar
mixes R = lambda R_eval + (1 - lambda) R_train with lambda chosen so the sorted eigenvalue
curves of lambda R_eval and (1 - lambda) R_train cross at component mix_k; damping adds
eta * mean(eigenvalues) to the diagonal. Full d x d or block-diagonal per layer. The stored
whitening is a factor W with W^T W = R^(-1) (same scores as R^(-1/2)); the mixed one is a low-rank
update of the train-only one when there are fewer queries than dimensions.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np


def autocorrelation(chunks: Iterable[np.ndarray], d: int,
                    all_reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, int]:
    """(1/N) sum_i g_i g_i^T over streamed row chunks (float32 matmuls, float64 accumulation).
    With `all_reduce` (a sum over processes, each streaming its own chunks) the result is global."""
    acc = np.zeros((d, d), dtype=np.float64)
    n = 0
    for x in chunks:
        x = np.ascontiguousarray(x, dtype=np.float32)
        acc += x.T @ x
        n += len(x)
    if all_reduce is not None:
        acc = all_reduce(acc)
        n = int(all_reduce(np.array([n], dtype=np.float64))[0])
    if n == 0:
        raise ValueError("cannot estimate a Hessian from zero rows")
    return acc / n, n


def eigvals_desc(r: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Eigenvalues of a symmetric matrix, largest first. float32 divide-and-conquer LAPACK by default:
    its error is far below the damping, and it is ~2x faster than float64 and ~3x faster than
    torch.linalg.eigh on 2 CPU cores (measured at d=3000). This module is numpy/scipy only (numpy's
    float32 products measured 1.1-1.3x torch's here), so the stages that only whiten skip torch."""
    scale = _scale(r)
    import scipy.linalg  # here, not at the top: the stages that only whiten do not pay for its import

    e = scipy.linalg.eigh((r / scale).astype(dtype), eigvals_only=True, driver="evd", check_finite=False)
    return (e.astype(np.float64) * scale)[::-1].copy()


def _scale(r: np.ndarray) -> float:
    """Mean eigenvalue (trace / d), or 1 for a zero matrix."""
    t = float(np.trace(r)) / len(r)
    return t if t > 0 else 1.0


def mix_lambda(eig_eval: np.ndarray, eig_train: np.ndarray, k: int) -> float:
    """lambda with lambda * e_eval[k] = (1 - lambda) * e_train[k] (k 1-based, curves sorted descending)."""
    if not 1 <= k <= min(len(eig_eval), len(eig_train)):
        raise ValueError(f"hessian.mix_k={k} is outside 1..{min(len(eig_eval), len(eig_train))} (d)")
    a, b = float(eig_eval[k - 1]), float(eig_train[k - 1])
    if a + b <= 0:
        raise ValueError(f"eigenvalues at component {k} are both zero; choose a smaller hessian.mix_k")
    return b / (a + b)


def eigh_scaled(r: np.ndarray, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray, float]:
    """Eigen-decomposition of R / scale, scale = mean eigenvalue (tiny entries would hit subnormal
    floats: very slow LAPACK): (eigenvalues ascending, clamped >= 0, float64; eigenvectors; scale)."""
    scale = _scale(r)
    import scipy.linalg

    e, v = scipy.linalg.eigh((r / scale).astype(dtype), driver="evd", check_finite=False)
    return np.clip(e.astype(np.float64), 0, None), v, scale


def damped_shift(trace: float, d: int, damping: float) -> float:
    """The damping term: damping * mean eigenvalue (trace / d), floored so a singular R stays invertible."""
    return max(damping, 1e-12) * max(trace / d, 1e-30)


def eig_scales(e: np.ndarray, scale: float, coef: float, shift: float) -> np.ndarray:
    """(coef * scale * e + shift)^(-1/2): the row scales of `eig_factor`."""
    return 1 / np.sqrt(coef * scale * e + shift)


def eig_factor(e: np.ndarray, vt: np.ndarray, scale: float, coef: float, shift: float) -> np.ndarray:
    """W = diag(a)^(-1/2) V^T with a = coef * scale * e + shift, so W^T W = (coef R + shift I)^(-1) for
    R = scale V diag(e) V^T (`eigh_scaled`'s output; `vt` = V^T, eigenvectors as rows). A whitening
    factor, not the symmetric root R^(-1/2) = V W: TrackStar uses only inner products and norms of W g,
    which every factor gives alike (W = O R^(-1/2), O orthogonal), and this one costs d^2, not d^3."""
    return np.ascontiguousarray(vt * eig_scales(e, scale, coef, shift).astype(vt.dtype)[:, None])


def low_rank_update(w0: np.ndarray, b: np.ndarray) -> np.ndarray:
    """W with W^T W = (A + U^T U)^(-1), given W0^T W0 = A^(-1) and B = W0 U^T (d x n, the n rows U
    mapped by W0): W = (I + B B^T)^(-1/2) W0 through the n x n Gram matrix of B, 2 d^2 n flops instead of
    a d^3 eigensolve. The mixed Hessian adds lambda R_eval, whose rank is at most the number of queries n."""
    w = np.ascontiguousarray(w0, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    s2, q = np.linalg.eigh((b.T @ b).astype(np.float64))  # B = P S Q^T: the n x n problem in float64
    root = np.sqrt(1 + np.clip(s2, 0, None))
    # (I + B B^T)^(-1/2) = I + B Q diag(f(s^2)) Q^T B^T, f(x) = ((1 + x)^(-1/2) - 1) / x, written without cancellation
    c = ((q * (-1 / (root * (1 + root)))) @ q.T).astype(np.float32)
    return w + (b @ c) @ (b.T @ w)


def whitening(r: np.ndarray, damping: float, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """A factor W with W^T W = (R + damping * mean(eig) I)^(-1) (see `eig_factor`) and the undamped
    eigenvalues of R, descending."""
    e, v, scale = eigh_scaled(r, dtype)
    return eig_factor(e, v.T, scale, 1.0, damped_shift(float(np.trace(r)), len(r), damping)), (e * scale)[::-1].copy()


def whitening_blocks(r: np.ndarray, blocks: list[tuple[int, int]], damping: float,
                     dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Block-diagonal whitening: each layer's block whitened on its own (off-diagonal blocks zero)."""
    w = np.zeros(r.shape, dtype=dtype)
    eigs = []
    for start, stop in blocks:
        wb, eb = whitening(np.ascontiguousarray(r[start:stop, start:stop]), damping, dtype)
        w[start:stop, start:stop] = wb
        eigs.append(eb)
    return w, np.sort(np.concatenate(eigs))[::-1].copy()


def whiten(x: np.ndarray, w: np.ndarray | None, normalize: bool) -> np.ndarray:
    """Rows x -> (W x) / ||W x|| (either step optional); float32."""
    t = np.ascontiguousarray(x, dtype=np.float32)
    if w is not None:
        t = t @ np.asarray(w, dtype=np.float32).T
    if normalize:
        t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-30)
    return t


def eigvals_desc_rows(rows: np.ndarray) -> np.ndarray:
    """Eigenvalues of (1/n) U^T U for the n x d rows U, largest first: from the n x n Gram matrix when
    n < d (the rest are zero), else from the d x d matrix."""
    n, d = rows.shape
    u = np.ascontiguousarray(rows, dtype=np.float32)
    if n >= d:
        return eigvals_desc((u.T @ u).astype(np.float64) / n)
    e = np.clip(np.linalg.eigvalsh((u @ u.T).astype(np.float64) / n), 0, None)[::-1]
    return np.concatenate([e, np.zeros(d - n)])
