"""Rerank reads: `StoreReader.read_rows` (rows grouped by chunk, gathered through a memory map of each
touched chunk file) against one pread per run of consecutive rows, same store and random row sets, alternating.

The pread path was the library's reader from 279a263 to edc64d2; this benchmark showed it slower and the
memory-map gather was restored. Synthetic store (random fp32 rows, uncompressed, 32 MB chunks, as the
preconditioned stores); `warm`: in the page cache, `cold`: every chunk file evicted (posix_fadvise DONTNEED)
before each timed read. Writes results/read_rows.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from trackstar.store import StoreReader, StoreSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import write_results  # noqa: E402
from common import show, write_store  # noqa: E402

HERE = Path(__file__).resolve().parent


def pread_rows(store: StoreReader, rows: np.ndarray) -> np.ndarray:
    """The alternative: distinct rows sorted, one os.preadv per run of consecutive rows of a chunk file,
    straight into the output buffer (uncompressed fp32 stores only)."""
    uniq, inv = np.unique(rows, return_inverse=True)
    got = np.empty((len(uniq), store.d), dtype=np.float32)
    row_bytes = store.d * 4
    chunk = uniq // store.chunk_rows
    bounds = [0, *(np.flatnonzero(np.diff(chunk)) + 1).tolist(), len(uniq)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        c = int(chunk[lo])
        local = uniq[lo:hi] - c * store.chunk_rows
        buf = memoryview(got[lo:hi]).cast("B")
        fd = os.open(store.path / store.array.path / store.array.metadata.encode_chunk_key((c, 0)), os.O_RDONLY)
        try:
            starts = [0, *(np.flatnonzero(np.diff(local) != 1) + 1).tolist()]
            for a, b in zip(starts, starts[1:] + [len(local)]):
                os.preadv(fd, [buf[a * row_bytes:b * row_bytes]], int(local[a]) * row_bytes)
        finally:
            os.close(fd)
    return got[inv.reshape(-1)]


def make_store(path: Path, rows: int, d: int) -> StoreReader:
    """Random fp32 rows, uncompressed, 32 MB chunks (kept in --work between runs)."""
    if not path.exists():
        write_store(path, StoreSpec(rows, d, ["g"], chunk_mb=32.0, attrs={"benchmark": "read_rows"}),
                    lambda c, a, b: np.random.default_rng(c).standard_normal((b - a, d), dtype=np.float32))
    return StoreReader(path)


def evict(store: StoreReader) -> None:
    """Drop the store's chunk files from the page cache (clean pages only; needs no privileges)."""
    for f in (store.path / store.array.path).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(store: StoreReader, n_read: int, repeats: int, cold: bool) -> dict[str, list[float]]:
    """Seconds per read of n_read distinct random rows, both methods on the same rows, alternating order."""
    rng = np.random.default_rng(1 if cold else 0)
    times = {"mmap_gather": [], "pread": []}
    for r in range(repeats):
        rows = rng.choice(store.n, n_read, replace=False)
        order = [("mmap_gather", lambda: store.read_rows(rows)), ("pread", lambda: pread_rows(store, rows))]
        got = {}
        for name, fn in (order if r % 2 == 0 else order[::-1]):  # alternate which goes first
            if cold:
                evict(store)
            t = time.perf_counter()
            got[name] = fn()
            times[name].append(time.perf_counter() - t)
        assert np.array_equal(got["mmap_gather"], got["pread"])
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--read", type=int, default=100_000, help="distinct random rows per read (a rerank batch)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", default="/tmp/trackstar-bench-read-rows")
    ap.add_argument("--out", default=str(HERE / "results/read_rows.json"))
    args = ap.parse_args()
    store = make_store(Path(args.work) / "store.zarr", args.rows, args.d)
    mb = args.read * args.d * 4 / 2**20
    cases = {}
    for case in ("warm", "cold"):
        if case == "warm":
            for _ in store.iter_chunks():  # warm the page cache
                pass
        times = measure(store, args.read, args.repeats, cold=case == "cold")
        med = {k: float(np.median(v)) for k, v in times.items()}
        cases[case] = {"seconds": times, "median_s": med, "mb_per_s": {k: mb / v for k, v in med.items()},
                       "speedup_pread_vs_mmap": med["mmap_gather"] / med["pread"]}
    result = {"rows": args.rows, "d": args.d, "read_rows": args.read, "repeats": args.repeats, "cases": cases}
    show("read_rows", write_results(Path(args.out), vars(args), result))


if __name__ == "__main__":
    main()
