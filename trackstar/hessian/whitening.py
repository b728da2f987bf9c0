"""The whitening R^(-1/2) (docs/method.md, step 4) from the Hessian statistics (`trackstar.hessian.stats`).

TrackStar mixes R = lambda R_eval + (1 - lambda) R_train with lambda chosen so the sorted eigenvalue curves of
lambda R_eval and (1 - lambda) R_train cross at component mix_k; damping adds eta * mean(eigenvalues) to the
diagonal. R is kept as diagonal blocks [start, stop) of the d columns. R_train's eigenbasis is the one d_b^3
step per block (`eigenbasis`); the whitening is a factor W with W^T W = R^(-1) (same scores as R^(-1/2)) in that
basis, and the mixed one a low-rank update of the train-only one (R_eval's rank is at most the number of
queries), so a lambda edit costs d m^2, not d^3.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from trackstar import tensorfile
from trackstar.hessian.blas import blas_for
from trackstar.hessian.stats import shrinkage_damping

def mix_lambda(eig_eval: np.ndarray, eig_train: np.ndarray, k: int) -> float:
    """lambda with lambda * e_eval[k] = (1 - lambda) * e_train[k] (k 1-based, curves sorted descending)."""
    if not 1 <= k <= min(len(eig_eval), len(eig_train)):
        raise ValueError(f"hessian.mix_k={k} is outside 1..{min(len(eig_eval), len(eig_train))} (d)")
    a, b = float(eig_eval[k - 1]), float(eig_train[k - 1])
    if a + b <= 0:
        raise ValueError(f"eigenvalues at component {k} are both zero; choose a smaller hessian.mix_k")
    return b / (a + b)


def eigh_scaled(r: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Eigen-decomposition of a float32 block R / scale, scale = mean eigenvalue (tiny entries would hit subnormal
    floats: very slow LAPACK), in r's own memory: r is consumed and comes back as the eigenvectors, so a d_b x d_b
    block costs its 4 d_b^2 bytes plus LAPACK's 8 d_b^2 workspace, no copies. Returns (eigenvalues ascending,
    clamped >= 0, float64; eigenvectors as columns; scale; trace of R in float64 from the diagonal).
    float32 divide-and-conquer LAPACK: ~2x faster than float64 and ~3x faster than torch.linalg.eigh on 2 CPU
    cores (measured at d=3000), at float32 accuracy: eigenvalues below ~1e-7 of the largest are rounding noise.
    The damping lifts every eigenvalue to at least damping * mean, so the damped inverse stays finite, but its
    relative error grows with the damped condition number: 1.6e-3 measured at damping 1e-3 on a rank-deficient R
    (tests/test_hessian.py), less with more damping. This module is numpy/scipy only (numpy's float32 products
    measured 1.1-1.3x torch's here), so the stages that only whiten skip torch."""
    import scipy.linalg

    if r.dtype != np.float32 or not r.flags.c_contiguous or not r.flags.writeable:
        r = np.array(r, dtype=np.float32, order="C")
    trace = float(np.trace(r, dtype=np.float64))
    scale = trace / len(r) if trace > 0 else 1.0
    np.divide(r, scale, out=r)
    # r is symmetric: its transpose is the same matrix in Fortran order, which LAPACK overwrites in place
    e, v = scipy.linalg.eigh(r.T, driver="evd", overwrite_a=True, check_finite=False)
    return np.clip(e.astype(np.float64), 0, None), v, scale, trace


def damped_shift(trace: float, d: int, damping: float) -> float:
    """The damping term: damping * mean eigenvalue (trace / d), floored so a singular R stays invertible."""
    return max(damping, 1e-12) * max(trace / d, 1e-30)


def eig_scales(e: np.ndarray, scale: float, coef: float, shift: float) -> np.ndarray:
    """(coef * scale * e + shift)^(-1/2): the row scales that whiten R = scale V diag(e) V^T in its eigenbasis."""
    return 1 / np.sqrt(coef * scale * e + shift)


@dataclass
class Block:
    """One diagonal block [start, stop) of the Hessian statistics in R_train's eigenbasis (the whole matrix
    is one block under hessian.structure=full): R_train = scale V diag(e) V^T, R_eval = E E^T, g = V^T E."""
    start: int
    stop: int
    e: np.ndarray           # eigenvalues of R_train / scale, ascending, clamped >= 0 (float64)
    scale: float            # mean eigenvalue of the block of R_train
    g: np.ndarray           # V^T E, d_b x m (m = rank bound of R_eval: queries, or d_b), float32
    trace_train: float
    trace_eval: float
    vt: np.ndarray | None = None  # V^T, eigenvectors as rows (d_b x d_b, float32); None when not loaded
    norm4: float = float("nan")  # mean over the training rows of ||g_b||^4 (NaN: not recorded)


def eigenbasis(r_train: Callable[[int], np.ndarray], blocks: list[tuple[int, int]], n_eval: int,
               query_chunks: Callable[[], Iterable[np.ndarray]], r_eval: Callable[[int], np.ndarray]) -> list[Block]:
    """Per block: the eigen-decomposition of R_train (the one d_b^3 step) and R_eval mapped into its basis.
    `r_train(i)` / `r_eval(i)` give block i as a fresh float32 array, which is consumed (one block in memory
    beyond the eigenvectors kept). R_eval = U^T U / n has rank <= n queries: with n < d_b, E = U^T / sqrt(n)
    comes from one pass over the query rows; otherwise from R_eval's own float64 eigen-decomposition. Nothing
    here depends on lambda or damping, so a mix_k / lambda / damping edit reuses it (`mixed_whitening`,
    `train_whitening`)."""
    with blas_for(max(b - a for a, b in blocks)):
        return _eigenbasis(r_train, blocks, n_eval, query_chunks, r_eval)


def _eigenbasis(r_train: Callable[[int], np.ndarray], blocks: list[tuple[int, int]], n_eval: int,
                query_chunks: Callable[[], Iterable[np.ndarray]], r_eval: Callable[[int], np.ndarray]) -> list[Block]:
    out = []
    for i, (start, stop) in enumerate(blocks):
        e, v, scale, trace = eigh_scaled(r_train(i))
        out.append(Block(start, stop, e, scale, np.empty((0, 0), np.float32), trace, 0.0, v.T))  # v.T: C-ordered
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
    import scipy.linalg

    for i, b in enumerate(out):
        if n_eval >= b.stop - b.start:
            re_ = r_eval(i).astype(np.float64)
            ev, q = scipy.linalg.eigh(re_.T, driver="evd", overwrite_a=True, check_finite=False)
            del re_
            q *= np.sqrt(np.clip(ev, 0, None))
            b.g = b.vt @ q.astype(np.float32)
            del q
    for b in out:
        b.trace_eval = float(np.einsum("ij,ij->", b.g, b.g, dtype=np.float64))  # tr(E E^T) = ||V^T E||_F^2
    return out


def spectra(blocks: list[Block]) -> tuple[np.ndarray, np.ndarray]:
    """The eigenvalues of R_train and of R_eval (block-diagonal parts when there are several blocks),
    each sorted descending: the curves the eigen-crossing rule compares."""
    et, ee = [], []
    with blas_for(max(max(b.g.shape) for b in blocks)):
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
        with blas_for(max(b - a for a, b in self.blocks)):
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


def block_dampings(blocks: list[Block], damping: float | str, n_train: int) -> list[float]:
    """Per block eta: `damping` itself, or for "auto" the Ledoit-Wolf shrinkage of R_train (`shrinkage_damping`)."""
    if damping != "auto":
        return [float(damping)] * len(blocks)
    if any(not np.isfinite(b.norm4) for b in blocks):
        raise ValueError("hessian.damping=auto needs the rows' fourth moments, which these Hessian statistics "
                         "lack; run `dvc repro` (autocorrelation, eigen) or set a number")
    return [shrinkage_damping(b.e, b.scale, b.norm4, n_train) for b in blocks]


def rank_report(blocks: list[Block], etas: list[float], n_train: int) -> dict:
    """What the damping did to a rank-deficient R_train: its rank bound, and how many eigen-directions fall
    below the shift (those the whitening no longer inflates: all R_train's null space when n_train < d)."""
    d = sum(b.stop - b.start for b in blocks)
    rank_bound = sum(min(n_train, b.stop - b.start) for b in blocks)
    below = sum(int(np.sum(b.e * b.scale < eta * b.trace_train / (b.stop - b.start))) for b, eta in zip(blocks, etas))
    return {"rank_deficient": rank_bound < d, "rank_bound": rank_bound, "d": d, "n_train": n_train,
            "directions_below_shift": below}


def train_whitening(blocks: list[Block], damping: float | list[float]) -> Whitening:
    """W with W^T W = (R_train + damping * mean(eig) I)^(-1), per block (the ladder's r_train rung);
    `damping` one eta for every block or one per block (`block_dampings`)."""
    etas = damping if isinstance(damping, (list, tuple)) else [damping] * len(blocks)
    s = [eig_scales(b.e, b.scale, 1.0, damped_shift(b.trace_train, b.stop - b.start, eta)).astype(np.float32)
         for b, eta in zip(blocks, etas)]
    empty = [np.zeros((b.stop - b.start, 0), np.float32) for b in blocks]
    return Whitening([(b.start, b.stop) for b in blocks], [b.vt for b in blocks], s, empty, empty)


def mixed_whitening(blocks: list[Block], lam: float, damping: float | list[float]) -> Whitening:
    """W with W^T W = (R_mix + damping * mean(eig) I)^(-1), R_mix = lam R_eval + (1 - lam) R_train, as a
    low-rank update of R_train's eigenbasis: with W0 = diag(s) V^T (the (1 - lam) R_train + shift part) and
    B = W0 E sqrt(lam), W = (I + B B^T)^(-1/2) W0 = (I + B C B^T) W0 through the m x m Gram matrix of B
    (float64), d_b m^2 flops instead of a d_b^3 eigensolve. `vt` may be unloaded (None): only s, L, R are
    computed here."""
    s, left, right = [], [], []
    with blas_for(max(max(b.g.shape) for b in blocks)):
        etas = damping if isinstance(damping, (list, tuple)) else [damping] * len(blocks)
        for b, eta in zip(blocks, etas):
            db = b.stop - b.start
            shift = damped_shift(lam * b.trace_eval + (1 - lam) * b.trace_train, db, eta)
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
            "trace_train": [b.trace_train for b in blocks], "trace_eval": [b.trace_eval for b in blocks],
            "norm4": [b.norm4 if np.isfinite(b.norm4) else None for b in blocks], "meta": meta}
    tensorfile.save(path, tensors, info)


def load_basis(path: str | Path, vectors: bool = True) -> tuple[list[Block], dict]:
    """(blocks, meta) from `save_basis`; the eigenvectors only when `vectors` (`mixed_whitening` needs none of
    them, so a lambda edit reads a few MB, not the basis)."""
    info = tensorfile.read_info(path)
    norm4 = [float("nan") if v is None else v for v in info.get("norm4", [None] * len(info["blocks"]))]
    blocks = [Block(start, stop, tensorfile.read_tensor(path, f"e.{i}"), info["scale"][i], tensorfile.read_tensor(path, f"g.{i}"),
                    info["trace_train"][i], info["trace_eval"][i], tensorfile.read_tensor(path, f"vt.{i}") if vectors else None,
                    norm4[i])
              for i, (start, stop) in enumerate(info["blocks"])]
    return blocks, info["meta"]


def save_whitening(path: str | Path, w: Whitening, meta: dict) -> None:
    """hessian/w_mix.safetensors: per block s.i, left.i, right.i (the basis V^T stays in eigen.safetensors)."""
    tensors = {}
    for i in range(len(w.blocks)):
        tensors.update({f"s.{i}": w.s[i], f"left.{i}": w.left[i], f"right.{i}": w.right[i]})
    tensorfile.save(path, tensors, {"blocks": [list(b) for b in w.blocks], "meta": meta})


def load_whitening(path: str | Path, basis_path: str | Path) -> tuple[Whitening, dict]:
    """The mixed whitening of `save_whitening` with its basis; refuses a basis it was not computed from."""
    from trackstar.errors import ArtifactMismatch

    info = tensorfile.read_info(path)
    parts = {k: [tensorfile.read_tensor(path, f"{k}.{i}") for i in range(len(info["blocks"]))] for k in ("s", "left", "right")}
    blocks, basis_meta = load_basis(basis_path)
    if basis_meta["basis_id"] != info["meta"]["basis_id"]:
        raise ArtifactMismatch(f"{path}: computed from basis {info['meta']['basis_id']} but {basis_path} is "
                               f"{basis_meta['basis_id']}; run `dvc repro`")
    return Whitening([tuple(b) for b in info["blocks"]], [b.vt for b in blocks], **parts), info["meta"]


def whiten(x: np.ndarray, w: Whitening | None, normalize: bool) -> np.ndarray:
    """Rows x -> (W x) / ||W x|| (either step optional); float32."""
    t = np.ascontiguousarray(x, dtype=np.float32)
    if w is not None:
        t = w.apply(t)
    if normalize:
        t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-30)
    return t
