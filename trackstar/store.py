"""Chunked Zarr stores of encodings: [N, d] arrays, row i = input line i.

Writing happens in a work directory: each chunk is written whole, then recorded done by a
marker file, so a crashed run resumes without redoing finished chunks and a chunk that was
being written is rewritten. `finalize` marks the store complete and renames it into place, so
the output path never holds a half-written store. Readers refuse incomplete stores and stores
whose attrs disagree with what they expect. bf16 is stored as a uint16 view (zarr 3.1 has no
bfloat16); attrs say so.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
import zarr.codecs

from trackstar.atomic import atomic_write_text, replace_dir
from trackstar.errors import ArtifactMismatch, TrackStarError
from trackstar.testhooks import crash_point

FORMAT = "trackstar-encodings/1"
_NP_DTYPE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}


def chunk_rows_for(d: int, dtype: str, chunk_mb: float, n_rows: int) -> int:
    """Rows per chunk so one chunk holds about chunk_mb megabytes, and no more rows than the store
    has: zarr keeps an uncompressed chunk at its full shape, so a 72-row store in 32 MB chunks
    would take 32 MB per array on disk (and in DVC's cache)."""
    rows = max(1, int(chunk_mb * 2**20 // (d * np.dtype(_NP_DTYPE[dtype]).itemsize)))
    return max(1, min(rows, n_rows))


def _compressors(name: str):
    if name == "none":
        return None
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=3)]
    if name == "blosc":
        return [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]
    raise ValueError(f"unknown compressor {name!r}")


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 rows -> the stored dtype (bf16 by round-to-nearest-even into a uint16 view)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "bf16":
        u = x.view(np.uint32)
        rounded = u + 0x7FFF + ((u >> 16) & 1)
        return (rounded >> 16).astype(np.uint16)
    return x.astype(_NP_DTYPE[dtype])


def from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows -> float32."""
    if dtype == "bf16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32, copy=False)


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds: `n_rows` rows of `d` columns in each of `arrays`, stored as `dtype` in chunks of about
    `chunk_mb` MB with `compressor`, and extra `attrs` naming where the rows came from."""
    n_rows: int
    d: int
    arrays: list[str]
    dtype: str = "fp32"
    chunk_mb: float = 32.0
    compressor: str = "none"
    attrs: dict = field(default_factory=dict)


class StoreWriter:
    """Creates or resumes a store under `work_dir`, then moves it to `path` when complete."""

    def __init__(self, path: str | Path, work_dir: str | Path, spec: StoreSpec):
        self.path, self.work = Path(path), Path(work_dir)
        self.store_path, self.done_dir = self.work / "store.zarr", self.work / "done"
        self.n, self.d, self.arrays, self.dtype = spec.n_rows, spec.d, spec.arrays, spec.dtype
        self.chunk_rows = chunk_rows_for(spec.d, spec.dtype, spec.chunk_mb, spec.n_rows)
        self.attrs = {"format": FORMAT, "n": spec.n_rows, "d": spec.d, "dtype": spec.dtype, "arrays": spec.arrays,
                      "chunk_rows": self.chunk_rows, "compressor": spec.compressor,
                      "storage_dtype": "uint16 view of bfloat16" if spec.dtype == "bf16" else spec.dtype,
                      **spec.attrs}
        self.compressor = spec.compressor

    @property
    def n_chunks(self) -> int:
        return (self.n + self.chunk_rows - 1) // self.chunk_rows

    def chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_rows, min(self.n, (c + 1) * self.chunk_rows)

    def prepare(self) -> bool:
        """Create the work store, or keep it if it was made with identical attrs. Returns True if resuming.
        Call on one process only (rank 0), then barrier."""
        if self.store_path.exists():
            try:
                old = dict(zarr.open_group(str(self.store_path), mode="r").attrs)
            except Exception:
                old = None
            if old == json.loads(json.dumps({**self.attrs, "complete": False})):
                self.done_dir.mkdir(parents=True, exist_ok=True)
                return True
        shutil.rmtree(self.work, ignore_errors=True)
        self.done_dir.mkdir(parents=True)
        g = zarr.open_group(str(self.store_path), mode="w")
        for name in self.arrays:
            g.create_array(name, shape=(self.n, self.d), chunks=(self.chunk_rows, self.d),
                           dtype=_NP_DTYPE[self.dtype], compressors=_compressors(self.compressor), fill_value=0)
        g.attrs.update({**self.attrs, "complete": False})
        return False

    def done_chunks(self) -> set[int]:
        return {int(p.name[1:]) for p in self.done_dir.glob("c*") if p.name[1:].isdigit()}

    def pending(self, rank: int = 0, world: int = 1) -> list[int]:
        """Chunks this rank still owes: whole chunks, assigned round-robin (one writer per chunk)."""
        done = self.done_chunks()
        return [c for c in range(self.n_chunks) if c % world == rank and c not in done]

    def write_chunk(self, c: int, rows: dict[str, np.ndarray]) -> None:
        """Write chunk c of every array whole, then record it done (marker written atomically)."""
        start, stop = self.chunk_range(c)
        g = zarr.open_group(str(self.store_path), mode="r+")
        for i, name in enumerate(self.arrays):
            if i == 1:
                crash_point(f"mid_write:{c}")
            x = rows[name]
            if x.shape != (stop - start, self.d):
                raise ValueError(f"chunk {c} of '{name}' has shape {x.shape}, expected {(stop - start, self.d)}")
            stored = to_storage(x, self.dtype)
            if self.dtype == "fp16" and not np.isfinite(stored).all() and np.isfinite(x).all():
                big = float(np.abs(x).max())
                raise TrackStarError(f"{self.path}: array '{name}', chunk {c} (rows {start}..{stop - 1}): a value of "
                                     f"magnitude {big:.4g} overflows float16 (largest {np.finfo(np.float16).max:.0f}); "
                                     f"set encode.dtype to bf16 (same size, float32's range) or fp32")
            g[name][start:stop] = stored
        atomic_write_text(self.done_dir / f"c{c:07d}", f"{start} {stop}\n")

    def finalize(self, extra_attrs: dict | None = None) -> None:
        """Mark complete and move into place; refuses if any chunk is missing."""
        missing = sorted(set(range(self.n_chunks)) - self.done_chunks())
        if missing:
            raise TrackStarError(f"{self.work}: cannot finalize, chunks not written: {missing[:10]}")
        g = zarr.open_group(str(self.store_path), mode="r+")
        g.attrs.update({**(extra_attrs or {}), "complete": True})
        replace_dir(self.store_path, self.path)
        shutil.rmtree(self.work, ignore_errors=True)


class StoreReader:
    """Reads a complete store chunk by chunk (float32), refusing incomplete or mismatched ones."""

    def __init__(self, path: str | Path, array: str = "g", expect: dict | None = None):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise TrackStarError(f"{self.path}: no encoding store here (missing zarr.json)")
        g = zarr.open_group(str(self.path), mode="r")
        self.attrs = dict(g.attrs)
        if self.attrs.get("format") != FORMAT:
            raise ArtifactMismatch(f"{self.path}: not a TrackStar encoding store (format={self.attrs.get('format')!r})")
        if not self.attrs.get("complete"):
            raise ArtifactMismatch(f"{self.path}: store is incomplete (an encode run did not finish); rerun encode")
        for key, want in (expect or {}).items():
            have = self.attrs.get(key)
            if json.loads(json.dumps(have)) != json.loads(json.dumps(want)):
                raise ArtifactMismatch(f"{self.path}: attr '{key}' is {have!r} but the current config expects {want!r}")
        if array not in g:
            raise ArtifactMismatch(f"{self.path}: has no array '{array}' (arrays: {self.attrs.get('arrays')})")
        self.array = g[array]
        self.n, self.d = self.array.shape
        self.chunk_rows = self.array.chunks[0]
        self.dtype = self.attrs["dtype"]

    def iter_chunks(self, rank: int = 0, world: int = 1, stop: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, float32 rows) per chunk, in order; one chunk in memory at a time. With `world` > 1
        only this rank's chunks (round-robin, as encode writes them); `stop` > 0 ends at that row."""
        end = min(self.n, stop) if stop else self.n
        for c, start in enumerate(range(0, end, self.chunk_rows)):
            if c % world == rank:
                yield start, from_storage(self.array[start:min(start + self.chunk_rows, end)], self.dtype)

    def read_all(self) -> np.ndarray:
        return from_storage(self.array[:], self.dtype)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows in the given order, read grouped by chunk (one read per touched chunk, not per row)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.d), dtype=np.float32)
        if len(rows) == 0:
            return out
        order = np.argsort(rows, kind="stable")  # rows grouped by chunk: one pass, no per-chunk scan of all rows
        chunk = rows[order] // self.chunk_rows
        bounds = np.flatnonzero(np.diff(chunk)) + 1
        for sel in np.split(order, bounds):
            c = int(rows[sel[0]] // self.chunk_rows)
            start = c * self.chunk_rows
            raw = self._mapped_chunk(c)
            if raw is not None:  # only the needed rows' pages are read
                out[sel] = from_storage(raw[rows[sel] - start], self.dtype)
            else:
                out[sel] = from_storage(self.array[start:start + self.chunk_rows], self.dtype)[rows[sel] - start]
        return out

    def _mapped_chunk(self, c: int) -> np.ndarray | None:
        """A memory map of chunk c's file when the store is uncompressed (zarr v3 keeps such a
        chunk as raw little-endian C-order bytes of the full chunk shape); None otherwise. Not kept
        across reads: touched pages of a kept map would count as this process's resident memory."""
        if self.attrs.get("compressor") != "none" or getattr(self.array.metadata, "zarr_format", 3) != 3:
            return None
        key = self.array.metadata.encode_chunk_key((c, 0))
        path = self.path / self.array.path / key
        shape = (self.chunk_rows, self.d)
        dtype = np.dtype(_NP_DTYPE[self.dtype]).newbyteorder("<")
        if not path.is_file() or path.stat().st_size != dtype.itemsize * shape[0] * shape[1]:
            return None  # e.g. a chunk never written because it equals the fill value
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)


class ConcatReader:
    """Several complete stores read as one [N, d] store, rows in the given order: the corpus's store, then
    its shards' (docs/shards.md). Every part must agree on d, dtype, checkpoint and encoding config."""

    def __init__(self, paths: list[str | Path], array: str = "g", expect: dict | None = None):
        self.parts = [StoreReader(p, array, expect) for p in paths]
        first = self.parts[0]
        for part in self.parts[1:]:
            for key in ("d", "dtype", "checkpoint_hash", "config"):
                if json.dumps(part.attrs.get(key), sort_keys=True) != json.dumps(first.attrs.get(key), sort_keys=True):
                    raise ArtifactMismatch(f"{part.path}: attr '{key}' differs from {first.path}; run `dvc repro`")
        self.attrs, self.d, self.dtype = first.attrs, first.d, first.dtype
        self.offsets = np.cumsum([0] + [p.n for p in self.parts])
        self.n = int(self.offsets[-1])
        self.path = first.path

    def iter_chunks(self, rank: int = 0, world: int = 1, stop: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(global start row, float32 rows) per stored chunk, parts in order; chunks numbered across parts and
        dealt round-robin to ranks; `stop` > 0 ends at that global row."""
        end = min(self.n, stop) if stop else self.n
        c = 0
        for off, part in zip(self.offsets[:-1].tolist(), self.parts):
            if off >= end:
                break
            for start, x in part.iter_chunks(stop=end - off):
                if c % world == rank:
                    yield off + start, x
                c += 1

    def iter_blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows) in blocks of `rows` rows (the last shorter) across part boundaries: the chunking of a
        store over all rows, whatever the parts' own chunk sizes."""
        buf, have, start = [], 0, 0
        for _, x in self.iter_chunks():
            while len(x):
                take = min(rows - have, len(x))
                buf.append(x[:take])
                have, x = have + take, x[take:]
                if have == rows:
                    yield start, np.concatenate(buf) if len(buf) > 1 else buf[0]
                    start, buf, have = start + rows, [], 0
        if have:
            yield start, np.concatenate(buf)

    def read_all(self) -> np.ndarray:
        return np.concatenate([p.read_all() for p in self.parts])

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows in the given order, each part's rows read grouped by chunk."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.d), dtype=np.float32)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        for i in np.unique(part):
            sel = np.flatnonzero(part == i)
            out[sel] = self.parts[i].read_rows(rows[sel] - self.offsets[i])
        return out

