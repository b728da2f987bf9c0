"""Gauss-Newton Hessian estimates and the whitening R^(-1/2) (docs/method.md, step 4).

R = (1/N) sum g g^T over projected, corrected gradients, streamed chunk by chunk. TrackStar
mixes R = lambda R_eval + (1 - lambda) R_train with lambda chosen so the sorted eigenvalue
curves of lambda R_eval and (1 - lambda) R_train cross at component mix_k; damping adds
eta * mean(eigenvalues) to the diagonal. R is kept as diagonal blocks [start, stop) of the d
columns: one block (the full d x d R), one per transformer layer or one per module, chosen from a
memory budget (`trackstar.plan`); only those blocks are ever accumulated or held. R_train's
eigenbasis is the one d_b^3 step per block (`eigenbasis`); the whitening is a factor W with
W^T W = R^(-1) (same scores as R^(-1/2)) in that basis, and the mixed one a low-rank update of the
train-only one (R_eval's rank is at most the number of queries), so a lambda edit costs d m^2, not d^3.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np


NARROW = 2048  # blocks narrower than this run their BLAS/LAPACK calls on one thread (`_blas_for`)


def _blas_for(width: int) -> contextlib.AbstractContextManager:
    """One BLAS thread while working on blocks at most `width` wide, when that is below NARROW: OpenBLAS's
    threads cost more than they save on small matrices (measured on 2 busy cores: a 1792-wide float32 eigh
    took 5.6 s CPU / 28 s wall on the default threads and 0.5 s / 2.9 s on one; 211 products of 256-wide
    blocks 20x less), while a wide full block keeps every thread."""
    if width >= NARROW:
        return contextlib.nullcontext()
    import scipy.linalg  # noqa: F401  (loads scipy's own OpenBLAS first: threadpoolctl limits only loaded libraries)
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _syrk_add(acc: np.ndarray, x: np.ndarray) -> None:
    """acc += x^T x on acc's lower triangle, in place: float64 BLAS syrk (half a matmul's flops, no d_b x d_b
    temporary). acc is C-ordered, so its transpose is the Fortran-ordered matrix BLAS updates."""
    from scipy.linalg.blas import dsyrk

    out = dsyrk(1.0, x.T, beta=1.0, c=acc.T, trans=0, lower=0, overwrite_c=1)
    if not np.shares_memory(out, acc):  # pragma: no cover - a BLAS wrapper that would not work in place
        acc[...] = out.T


def _symmetrize(acc: np.ndarray, slab: int = 2048) -> None:
    """Copy the lower triangle onto the upper one in place, a row slab at a time (no d_b x d_b temporary)."""
    n = len(acc)
    for i in range(0, n, slab):
        j = min(n, i + slab)
        acc[i:j, j:] = acc[j:, i:j].T
        for r in range(i, j - 1):  # inside the slab's diagonal square, row by row
            acc[r, r + 1:j] = acc[r + 1:j, r]


def autocorrelation_sums(chunks: Iterable[np.ndarray], blocks: list[tuple[int, int]]) -> tuple[list[np.ndarray], int]:
    """Unnormalized sums S_b = sum_i g_i[b] g_i[b]^T of the diagonal blocks [start, stop) only, over streamed row
    chunks, and the row count: symmetric float64 (float64 syrk per chunk, 8 d_b^2 bytes per block, nothing
    d x d). Sums over disjoint row sets (processes, corpus shards) add up to the sum over their union;
    `normalize_sums` divides by the total count."""
    acc = [np.zeros((stop - start, stop - start), dtype=np.float64) for start, stop in blocks]
    n = 0
    with _blas_for(max((b - a for a, b in blocks), default=0)):
        for x in chunks:
            x = np.asarray(x, dtype=np.float32)
            for a, (start, stop) in zip(acc, blocks):
                _syrk_add(a, np.ascontiguousarray(x[:, start:stop], dtype=np.float64))
            n += len(x)
    for a in acc:
        _symmetrize(a)
    return acc, n


def normalize_sums(sums: list[np.ndarray], n: int) -> list[np.ndarray]:
    """R_b = S_b / n, in place; refuses n = 0."""
    if n == 0:
        raise ValueError("cannot estimate a Hessian from zero rows")
    for s in sums:
        s /= n
    return sums


def autocorrelation(chunks: Iterable[np.ndarray], blocks: list[tuple[int, int]],
                    all_reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[list[np.ndarray], int]:
    """The diagonal blocks of (1/N) sum_i g_i g_i^T over streamed row chunks (float64). With `all_reduce` (a sum
    over processes, each streaming its own chunks; it may work in place) the result is global."""
    sums, n = autocorrelation_sums(chunks, blocks)
    if all_reduce is not None:
        sums = [all_reduce(x) for x in sums]
        n = int(all_reduce(np.array([n], dtype=np.float64))[0])
    return normalize_sums(sums, n), n


@dataclass
class Stats:
    """hessian/stats.safetensors read lazily: the meta and, per block i, R_train's block and (for blocks no wider
    than the number of queries, the only ones `eigenbasis` decomposes) R_eval's, each as a fresh float32 array."""
    path: Path
    meta: dict

    @property
    def blocks(self) -> list[tuple[int, int]]:
        return [tuple(b) for b in self.meta["blocks"]]

    def r_train(self, i: int) -> np.ndarray:
        return _read_tensor(self.path, f"r_train.{i}")

    def r_eval(self, i: int) -> np.ndarray:
        return _read_tensor(self.path, f"r_eval.{i}")


def save_stats(path: str | Path, r_train: list[np.ndarray], r_eval: dict[int, np.ndarray], meta: dict) -> None:
    """The per-block statistics as float32 tensors r_train.i (every block of meta["blocks"]) and r_eval.i (the
    blocks in `r_eval`), written block by block in slabs (no second copy of the accumulators)."""
    tensors = {f"r_train.{i}": r for i, r in enumerate(r_train)}
    tensors.update({f"r_eval.{i}": r for i, r in sorted(r_eval.items())})
    _save(path, tensors, meta, dtype=np.float32)


def load_stats(path: str | Path) -> Stats:
    return Stats(Path(path), _read_info(path))


def norm4_sums(x: np.ndarray, blocks: list[tuple[int, int]]) -> np.ndarray:
    """Per column range [start, stop): the sum over rows of ||x_row[start:stop]||^4 (float64), the one extra
    statistic the Ledoit-Wolf shrinkage (`shrinkage_damping`) needs beyond R itself."""
    x = np.asarray(x, dtype=np.float32)
    return np.array([float(np.sum(np.sum(x[:, a:b].astype(np.float64) ** 2, axis=1) ** 2)) for a, b in blocks])


def shrinkage_damping(e: np.ndarray, scale: float, norm4: float, n: int) -> float:
    """Damping eta (R + eta * mean(eig) I) from the Ledoit-Wolf (2004) shrinkage of R = (1/n) sum g g^T towards
    mean(eig) I: rho = b^2 / d^2 with d^2 = ||R - mean(eig) I||_F^2 (the spread of the spectrum) and
    b^2 = (mean ||g||^4 - ||R||_F^2) / n (the sampling error of R, from the same rows); eta = rho / (1 - rho).
    Nothing is tuned: the fewer rows (n << d) and the heavier-tailed their norms, the stronger the damping.
    `e`: R / scale's eigenvalues; `norm4`: mean over rows of ||g||^4."""
    lam = np.asarray(e, dtype=np.float64) * scale
    mu = float(lam.mean())
    fro2 = float(np.sum(lam ** 2))
    d2 = fro2 - len(lam) * mu * mu
    if d2 <= 0 or n < 1:
        return 1e3  # a flat (or empty) spectrum: whitening would change nothing; damp fully
    b2 = max(norm4 - fro2, 0.0) / n
    rho = min(b2 / d2, 1.0)
    return min(rho / max(1.0 - rho, 1e-3), 1e3)


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
    with _blas_for(max(b - a for a, b in blocks)):
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
    with _blas_for(max(max(b.g.shape) for b in blocks)):
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
        with _blas_for(max(b - a for a, b in self.blocks)):
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
    with _blas_for(max(max(b.g.shape) for b in blocks)):
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
    _save(path, tensors, info)


def load_basis(path: str | Path, vectors: bool = True) -> tuple[list[Block], dict]:
    """(blocks, meta) from `save_basis`; the eigenvectors only when `vectors` (`mixed_whitening` needs none of
    them, so a lambda edit reads a few MB, not the basis)."""
    info = _read_info(path)
    norm4 = [float("nan") if v is None else v for v in info.get("norm4", [None] * len(info["blocks"]))]
    blocks = [Block(start, stop, _read_tensor(path, f"e.{i}"), info["scale"][i], _read_tensor(path, f"g.{i}"),
                    info["trace_train"][i], info["trace_eval"][i], _read_tensor(path, f"vt.{i}") if vectors else None,
                    norm4[i])
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
    from trackstar.errors import ArtifactMismatch

    info = _read_info(path)
    parts = {k: [_read_tensor(path, f"{k}.{i}") for i in range(len(info["blocks"]))] for k in ("s", "left", "right")}
    blocks, basis_meta = load_basis(basis_path)
    if basis_meta["basis_id"] != info["meta"]["basis_id"]:
        raise ArtifactMismatch(f"{path}: computed from basis {info['meta']['basis_id']} but {basis_path} is "
                               f"{basis_meta['basis_id']}; run `dvc repro`")
    return Whitening([tuple(b) for b in info["blocks"]], [b.vt for b in blocks], **parts), info["meta"]


# The files above are safetensors files (readable by `safetensors`), written and read here tensor by tensor:
# safetensors.numpy.save_file first copies every array into bytes (twice the memory of a d x d basis), and
# safe_open's arrays are read-only views that `eigh_scaled` would have to copy again.
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "U16": np.uint16}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
_SLAB_BYTES = 64 << 20


def _save(path: str | Path, tensors: dict[str, np.ndarray], info: dict, dtype: type | None = None) -> None:
    """Write `tensors` (each cast to `dtype` if given, a row slab at a time) with `info` as JSON metadata,
    through a temp path + rename."""
    path = Path(path)
    header, offset = {"__metadata__": {"info": json.dumps(info)}}, 0
    for name, a in tensors.items():
        dt = np.dtype(dtype or a.dtype)
        size = int(np.prod(a.shape)) * dt.itemsize
        header[name] = {"dtype": _CODES[dt], "shape": list(a.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in tensors.values():
            if a.size == 0:
                continue
            dt = np.dtype(dtype or a.dtype).newbyteorder("<")
            a = a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(1, -1)
            rows = max(1, _SLAB_BYTES // max(1, a.shape[1] * dt.itemsize))
            for i in range(0, len(a), rows):
                f.write(np.ascontiguousarray(a[i:i + rows], dtype=dt).data)
    os.replace(tmp, path)


def _read_header(path: str | Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _read_info(path: str | Path) -> dict:
    return json.loads(_read_header(path)[0]["__metadata__"]["info"])


def _read_tensor(path: str | Path, name: str) -> np.ndarray:
    """One tensor as a fresh, writable array read straight from the file."""
    header, base = _read_header(path)
    t = header[name]
    dt = np.dtype(_DTYPES[t["dtype"]]).newbyteorder("<")
    start, stop = t["data_offsets"]
    return np.fromfile(path, dtype=dt, count=(stop - start) // dt.itemsize, offset=base + start).reshape(t["shape"])


def whiten(x: np.ndarray, w: Whitening | None, normalize: bool) -> np.ndarray:
    """Rows x -> (W x) / ||W x|| (either step optional); float32."""
    t = np.ascontiguousarray(x, dtype=np.float32)
    if w is not None:
        t = w.apply(t)
    if normalize:
        t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-30)
    return t
