"""Safetensors files (readable by `safetensors`) of numpy arrays with one JSON `info` record as metadata, written
and read tensor by tensor: safetensors.numpy.save_file first copies every array into bytes (twice the memory
of a d x d basis), and safe_open's arrays are read-only views that a consumer would have to copy again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trackstar.atomic import atomic_open

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "U16": np.uint16}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
_SLAB_BYTES = 64 << 20


def save(path: str | Path, tensors: dict[str, np.ndarray], info: dict | None = None, dtype: type | None = None,
         metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (each cast to `dtype` if given, a row slab at a time) with `info` as JSON metadata (or
    `metadata`'s string entries, in sorted order), atomically. The header's bytes depend only on the inputs:
    safetensors' own writer orders metadata keys at random, so the same tensors gave different files."""
    meta = {"info": json.dumps(info)} if metadata is None else dict(sorted(metadata.items()))
    header, offset = {"__metadata__": meta}, 0
    for name, a in tensors.items():
        dt = np.dtype(dtype or a.dtype)
        size = int(np.prod(a.shape)) * dt.itemsize
        header[name] = {"dtype": _CODES[dt], "shape": list(a.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_open(path, "wb") as f:
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


def _read_header(path: str | Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def read_info(path: str | Path) -> dict:
    """The `info` record `save` stored."""
    return json.loads(_read_header(path)[0]["__metadata__"]["info"])


def read_tensor(path: str | Path, name: str) -> np.ndarray:
    """One tensor as a fresh, writable array read straight from the file."""
    header, base = _read_header(path)
    t = header[name]
    dt = np.dtype(_DTYPES[t["dtype"]]).newbyteorder("<")
    start, stop = t["data_offsets"]
    return np.fromfile(path, dtype=dt, count=(stop - start) // dt.itemsize, offset=base + start).reshape(t["shape"])
