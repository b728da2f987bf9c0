"""Per-shard partial autocorrelations: the unnormalized sums S_b = sum_i g_i[b] g_i[b]^T of one corpus shard's
rows (per diagonal block b) and its row count, one file per shard. Sums over disjoint rows add, so R_train of
the corpus and its shards is (S_corpus + sum of the shards' S) / N: adding a shard computes only its own sums.
Each file records the store it was computed from; a reader refuses one that does not match."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trackstar import tensorfile
from trackstar.errors import ArtifactMismatch
from trackstar.hessian.stats import Sums
from trackstar.store import StoreReader

IDENTITY = ("split", "input_sha256", "checkpoint_hash", "config", "d", "dtype")


def identity(store: StoreReader) -> dict:
    """What names a store's rows: its input file's hash, the checkpoint, the encoding config."""
    return json.loads(json.dumps({k: store.attrs.get(k) for k in IDENTITY}, sort_keys=True))


def save_partial(path: str | Path, sums: Sums, blocks: list[tuple[int, int]], store: StoreReader) -> None:
    """The sums as float32 tensors sum.<i> (the stats they feed are float32) with n, blocks, the per-block sums
    of ||g_b||^4 (the Ledoit-Wolf damping's statistic) and the store's identity as metadata, atomically."""
    info = {"n": sums.n, "blocks": [list(b) for b in blocks], "store": identity(store),
            "norm4": [float(v) for v in sums.norm4]}
    tensorfile.save(path, {f"sum.{i}": s for i, s in enumerate(sums.s)}, info, dtype=np.float32)


def partial_blocks(path: str | Path) -> list[tuple[int, int]]:
    """The Hessian blocks a partial was computed for."""
    return [tuple(b) for b in tensorfile.read_info(path)["blocks"]]


def add_partial(path: str | Path, sums: Sums, blocks: list[tuple[int, int]], store: StoreReader) -> None:
    """sums += the file's sums, row count and ||g_b||^4 sums (in place). Refuses a file computed from other rows
    or blocks than `store` and `blocks`."""
    info = tensorfile.read_info(path)
    if info["store"] != identity(store):
        raise ArtifactMismatch(f"{path}: computed from other encodings than {store.path}; run `dvc repro`")
    if [tuple(b) for b in info["blocks"]] != [tuple(b) for b in blocks]:
        raise ArtifactMismatch(f"{path}: blocks {info['blocks']} differ from {blocks}; run `dvc repro`")
    for i, s in enumerate(sums.s):
        s += tensorfile.read_tensor(path, f"sum.{i}")
    sums.norm4 += np.asarray(info["norm4"], dtype=np.float64)
    sums.n += int(info["n"])
