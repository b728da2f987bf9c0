"""Gauss-Newton Hessian estimates and the whitening R^(-1/2) (docs/method.md, step 4).

R = (1/N) sum g g^T over projected, corrected gradients, streamed chunk by chunk. TrackStar
mixes R = lambda R_eval + (1 - lambda) R_train with lambda chosen so the sorted eigenvalue
curves of lambda R_eval and (1 - lambda) R_train cross at component mix_k; damping adds
eta * mean(eigenvalues) to the diagonal. Full d x d or block-diagonal per layer. R_train's
eigenbasis is the one d^3 step (`eigenbasis`); the whitening is a factor W with W^T W = R^(-1)
(same scores as R^(-1/2)) in that basis, and the mixed one a low-rank update of the train-only one
(R_eval's rank is at most the number of queries), so a lambda edit costs d m^2, not d^3.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
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
    floats: very slow LAPACK): (eigenvalues ascending, clamped >= 0, float64; eigenvectors; scale).
    float32 divide-and-conquer LAPACK by default. Its error is of the order of the default damping, not
    far below it: W^T W differs from the float64 damped inverse by 1.5e-3 (relative) at damping 1e-3 on
    the default pipeline (benchmarks/whitening.py; 99 % of top-10 sets agree) and 1.6e-3 on a
    rank-deficient R in tests/test_hessian.py. It is ~2x
    faster than float64 and ~3x faster than torch.linalg.eigh on 2 CPU cores (measured at d=3000).
    This module is numpy/scipy only (numpy's float32 products measured 1.1-1.3x torch's here), so the
    stages that only whiten skip torch."""
    scale = _scale(r)
    import scipy.linalg

    e, v = scipy.linalg.eigh((r / scale).astype(dtype), driver="evd", check_finite=False)
    return np.clip(e.astype(np.float64), 0, None), v, scale


def damped_shift(trace: float, d: int, damping: float) -> float:
    """The damping term: damping * mean eigenvalue (trace / d), floored so a singular R stays invertible."""
    return max(damping, 1e-12) * max(trace / d, 1e-30)


def eig_scales(e: np.ndarray, scale: float, coef: float, shift: float) -> np.ndarray:
    """(coef * scale * e + shift)^(-1/2): the row scales that whiten R = scale V diag(e) V^T in its eigenbasis."""
    return 1 / np.sqrt(coef * scale * e + shift)


@dataclass
class Block:
    """One diagonal block [start, stop) of the Hessian statistics in R_train's eigenbasis (the whole matrix
    is one block unless hessian.block_diagonal): R_train = scale V diag(e) V^T, R_eval = E E^T, g = V^T E."""
    start: int
    stop: int
    e: np.ndarray           # eigenvalues of R_train / scale, ascending, clamped >= 0 (float64)
    scale: float            # mean eigenvalue of the block of R_train
    g: np.ndarray           # V^T E, d_b x m (m = rank bound of R_eval: queries, or d_b), float32
    trace_train: float
    trace_eval: float
    vt: np.ndarray | None = None  # V^T, eigenvectors as rows (d_b x d_b, float32); None when not loaded


def eigenbasis(r_train: np.ndarray, blocks: list[tuple[int, int]], n_eval: int,
               query_chunks: Callable[[], Iterable[np.ndarray]], r_eval: Callable[[], np.ndarray]) -> list[Block]:
    """Per block: the eigen-decomposition of R_train (the one d^3 step) and R_eval mapped into its basis.
    R_eval = U^T U / n has rank <= n queries: with n < d_b, E = U^T / sqrt(n) comes from one pass over
    the query rows; otherwise from R_eval's own eigen-decomposition. Nothing here depends on lambda or
    damping, so a mix_k / lambda / damping edit reuses it (`mixed_whitening`, `train_whitening`)."""
    out = []
    for start, stop in blocks:
        rt = np.ascontiguousarray(r_train[start:stop, start:stop])
        e, v, scale = eigh_scaled(rt)
        vt = np.ascontiguousarray(v.T)
        out.append(Block(start, stop, e, scale, np.empty((0, 0), np.float32),
                         float(np.trace(rt.astype(np.float64))), 0.0, vt))
    low = [b for b in out if n_eval < b.stop - b.start]
    for b in low:
        b.g = np.empty((b.stop - b.start, n_eval), dtype=np.float32)
    if low:  # one streamed pass over the query rows fills every low-rank block
        row = 0
        for x in query_chunks():
            x = np.asarray(x, dtype=np.float32)
            for b in low:
                b.g[:, row:row + len(x)] = b.vt @ (x[:, b.start:b.stop].T / np.float32(np.sqrt(n_eval)))
            row += len(x)
        if row != n_eval:
            raise ValueError(f"the query store has {row} rows, the Hessian statistics {n_eval}")
    full = [b for b in out if n_eval >= b.stop - b.start]
    if full:
        import scipy.linalg

        re_ = r_eval()
        for b in full:
            ev, q = scipy.linalg.eigh(re_[b.start:b.stop, b.start:b.stop].astype(np.float64), driver="evd",
                                      check_finite=False)
            b.g = (b.vt.astype(np.float64) @ (q * np.sqrt(np.clip(ev, 0, None)))).astype(np.float32)
    for b in out:
        b.trace_eval = float(np.sum(b.g.astype(np.float64) ** 2))  # tr(E E^T) = ||V^T E||_F^2
    return out


def spectra(blocks: list[Block]) -> tuple[np.ndarray, np.ndarray]:
    """The eigenvalues of R_train and of R_eval (block-diagonal parts when there are several blocks),
    each sorted descending: the curves the eigen-crossing rule compares."""
    et, ee = [], []
    for b in blocks:
        et.append(b.e * b.scale)
        g = b.g.astype(np.float64)
        ev = np.clip(np.linalg.eigvalsh(g.T @ g), 0, None)  # nonzero eigenvalues of E^T E = those of E E^T
        ee.append(np.concatenate([ev, np.zeros(b.stop - b.start - len(ev))]))
    return np.sort(np.concatenate(et))[::-1].copy(), np.sort(np.concatenate(ee))[::-1].copy()


@dataclass
class Whitening:
    """A factor W with W^T W = R^(-1) for a damped R, block by block: W_b = (I + L_b R_b^T) diag(s_b) V_b^T.
    Not the symmetric root R^(-1/2): TrackStar uses only inner products and norms of W g, which every
    factor gives alike (W = O R^(-1/2), O orthogonal). The low-rank term (d_b x m) carries the queries'
    R_eval; V^T is shared with R_train's basis, so a lambda edit rewrites only s, L and R."""
    blocks: list[tuple[int, int]]
    vt: list[np.ndarray]
    s: list[np.ndarray]
    left: list[np.ndarray]
    right: list[np.ndarray]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Rows x -> rows (W x)^T, float32: per block one d_b x d_b product plus 2 d_b m for the update."""
        x = np.asarray(x, dtype=np.float32)
        out = np.empty(x.shape, dtype=np.float32)
        for (start, stop), vt, s, left, right in zip(self.blocks, self.vt, self.s, self.left, self.right):
            h = x[:, start:stop] @ vt.T
            h *= s
            if right.shape[1]:
                h += (h @ right) @ left.T
            out[:, start:stop] = h
        return out

    def matrix(self) -> np.ndarray:
        """The dense d x d W (float64), for checks and references: W = apply(I)^T."""
        d = self.blocks[-1][1]
        return self.apply(np.eye(d, dtype=np.float32)).T.astype(np.float64)


def train_whitening(blocks: list[Block], damping: float) -> Whitening:
    """W with W^T W = (R_train + damping * mean(eig) I)^(-1), per block (the ladder's r_train rung)."""
    s = [eig_scales(b.e, b.scale, 1.0, damped_shift(b.trace_train, b.stop - b.start, damping)).astype(np.float32)
         for b in blocks]
    empty = [np.zeros((b.stop - b.start, 0), np.float32) for b in blocks]
    return Whitening([(b.start, b.stop) for b in blocks], [b.vt for b in blocks], s, empty, empty)


def mixed_whitening(blocks: list[Block], lam: float, damping: float) -> Whitening:
    """W with W^T W = (R_mix + damping * mean(eig) I)^(-1), R_mix = lam R_eval + (1 - lam) R_train, as a
    low-rank update of R_train's eigenbasis: with W0 = diag(s) V^T (the (1 - lam) R_train + shift part) and
    B = W0 E sqrt(lam), W = (I + B B^T)^(-1/2) W0 = (I + B C B^T) W0 through the m x m Gram matrix of B
    (float64), d_b m^2 flops instead of a d_b^3 eigensolve. `vt` may be unloaded (None): only s, L, R are
    computed here."""
    s, left, right = [], [], []
    for b in blocks:
        db = b.stop - b.start
        shift = damped_shift(lam * b.trace_eval + (1 - lam) * b.trace_train, db, damping)
        sb = eig_scales(b.e, b.scale, 1 - lam, shift)
        bb = (b.g.astype(np.float64) * (sb * np.sqrt(lam))[:, None])
        s2, q = np.linalg.eigh(bb.T @ bb)
        root = np.sqrt(1 + np.clip(s2, 0, None))
        # (I + B B^T)^(-1/2) = I + B Q diag(f(s^2)) Q^T B^T, f(x) = ((1 + x)^(-1/2) - 1) / x, written without cancellation
        c = (q * (-1 / (root * (1 + root)))) @ q.T
        s.append(sb.astype(np.float32))
        left.append((bb @ c).astype(np.float32))
        right.append(bb.astype(np.float32))
    return Whitening([(b.start, b.stop) for b in blocks], [b.vt for b in blocks], s, left, right)


def save_basis(path: str | Path, blocks: list[Block], meta: dict) -> None:
    """hessian/eigen.safetensors: per block i tensors vt.i, e.i, g.i; scales, traces and `meta` as JSON metadata."""
    tensors = {}
    for i, b in enumerate(blocks):
        tensors.update({f"vt.{i}": b.vt, f"e.{i}": b.e, f"g.{i}": b.g})
    info = {"blocks": [[b.start, b.stop] for b in blocks], "scale": [b.scale for b in blocks],
            "trace_train": [b.trace_train for b in blocks], "trace_eval": [b.trace_eval for b in blocks], "meta": meta}
    _save(path, tensors, info)


def load_basis(path: str | Path, vectors: bool = True) -> tuple[list[Block], dict]:
    """(blocks, meta) from `save_basis`; the d x d eigenvectors only when `vectors` (`mixed_whitening` needs
    none of them, so a lambda edit reads a few MB, not the basis)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        info = json.loads(f.metadata()["info"])
        blocks = [Block(start, stop, f.get_tensor(f"e.{i}"), info["scale"][i], f.get_tensor(f"g.{i}"),
                        info["trace_train"][i], info["trace_eval"][i], f.get_tensor(f"vt.{i}") if vectors else None)
                  for i, (start, stop) in enumerate(info["blocks"])]
    return blocks, info["meta"]


def save_whitening(path: str | Path, w: Whitening, meta: dict) -> None:
    """hessian/w_mix.safetensors: per block s.i, left.i, right.i (the basis V^T stays in eigen.safetensors)."""
    tensors = {}
    for i in range(len(w.blocks)):
        tensors.update({f"s.{i}": w.s[i], f"left.{i}": w.left[i], f"right.{i}": w.right[i]})
    _save(path, tensors, {"blocks": [list(b) for b in w.blocks], "meta": meta})


def load_whitening(path: str | Path, basis_path: str | Path) -> tuple[Whitening, dict]:
    """The mixed whitening of `save_whitening` with its basis; refuses a basis it was not computed from."""
    from safetensors import safe_open

    from .errors import ArtifactMismatch

    with safe_open(str(path), "np") as f:
        info = json.loads(f.metadata()["info"])
        parts = {k: [f.get_tensor(f"{k}.{i}") for i in range(len(info["blocks"]))] for k in ("s", "left", "right")}
    blocks, basis_meta = load_basis(basis_path)
    if basis_meta["basis_id"] != info["meta"]["basis_id"]:
        raise ArtifactMismatch(f"{path}: computed from basis {info['meta']['basis_id']} but {basis_path} is "
                               f"{basis_meta['basis_id']}; run `dvc repro`")
    return Whitening([tuple(b) for b in info["blocks"]], [b.vt for b in blocks], **parts), info["meta"]


def _save(path: str | Path, tensors: dict[str, np.ndarray], info: dict) -> None:
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata={"info": json.dumps(info)})
    os.replace(tmp, path)


def whiten(x: np.ndarray, w: Whitening | None, normalize: bool) -> np.ndarray:
    """Rows x -> (W x) / ||W x|| (either step optional); float32."""
    t = np.ascontiguousarray(x, dtype=np.float32)
    if w is not None:
        t = w.apply(t)
    if normalize:
        t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-30)
    return t
