"""The Gauss-Newton Hessian statistics (docs/method.md, step 4): R = (1/N) sum g g^T over projected, corrected
gradients, streamed chunk by chunk, as diagonal blocks [start, stop) of the d columns (the structure
`trackstar.hessian.plan` picks), their file (hessian/stats.safetensors), and the rows' fourth moments with the
Ledoit-Wolf shrinkage damping they give."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from trackstar import tensorfile
from trackstar.hessian.blas import blas_for

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
    with blas_for(max((b - a for a, b in blocks), default=0)):
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
class Sums:
    """Unnormalized per-block statistics of some rows: S_b = sum g[b] g[b]^T (float64), the row count and, per
    block, the sum of ||g_b||^4. Sums over disjoint rows (processes, corpus shards) add up."""
    s: list[np.ndarray]
    n: int
    norm4: np.ndarray

    @classmethod
    def of_rows(cls, chunks: Iterable[np.ndarray], blocks: list[tuple[int, int]]) -> "Sums":
        """The statistics of the streamed row chunks."""
        norm4 = np.zeros(len(blocks))
        s, n = autocorrelation_sums(_tapped(chunks, blocks, norm4), blocks)
        return cls(s, n, norm4)

    def all_reduce(self, reduce: Callable[[np.ndarray], np.ndarray]) -> None:
        """Sum over processes, each holding the statistics of its own rows (`reduce` may work in place)."""
        self.s = [reduce(x) for x in self.s]
        self.n = int(reduce(np.array([self.n], dtype=np.float64))[0])
        self.norm4[:] = reduce(self.norm4)

    def add_rows(self, chunks: Iterable[np.ndarray], blocks: list[tuple[int, int]]) -> None:
        """Add the rows of the streamed chunks: their S_b (summed apart, then added) and their ||g_b||^4 (added
        into norm4 chunk by chunk)."""
        more, m = autocorrelation_sums(_tapped(chunks, blocks, self.norm4), blocks)
        for s, x in zip(self.s, more):
            s += x
        self.n += m

    def normalized(self) -> list[np.ndarray]:
        """R_b = S_b / n (in place of S_b)."""
        return normalize_sums(self.s, self.n)


def _tapped(chunks: Iterable[np.ndarray], blocks: list[tuple[int, int]], s4: np.ndarray) -> Iterator[np.ndarray]:
    """Pass row chunks through, adding each block's sum of ||g_b||^4 into s4."""
    for x in chunks:
        s4 += norm4_sums(x, blocks)
        yield x


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
        return tensorfile.read_tensor(self.path, f"r_train.{i}")

    def r_eval(self, i: int) -> np.ndarray:
        return tensorfile.read_tensor(self.path, f"r_eval.{i}")


def save_stats(path: str | Path, r_train: list[np.ndarray], r_eval: dict[int, np.ndarray], meta: dict) -> None:
    """The per-block statistics as float32 tensors r_train.i (every block of meta["blocks"]) and r_eval.i (the
    blocks in `r_eval`), written block by block in slabs (no second copy of the accumulators)."""
    tensors = {f"r_train.{i}": r for i, r in enumerate(r_train)}
    tensors.update({f"r_eval.{i}": r for i, r in sorted(r_eval.items())})
    tensorfile.save(path, tensors, meta, dtype=np.float32)


def load_stats(path: str | Path) -> Stats:
    return Stats(Path(path), tensorfile.read_info(path))


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

