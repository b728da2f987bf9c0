"""Per-shard partial autocorrelations: the unnormalized sums S_b = sum_i g_i[b] g_i[b]^T of one corpus shard's
rows (per diagonal block b) and its row count, one file per shard. Sums over disjoint rows add, so R_train of
the corpus and its shards is (S_corpus + sum of the shards' S) / N: adding a shard computes only its own sums.
Each file records the store it was computed from; a reader refuses one that does not match."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from trackstar.errors import ArtifactMismatch, TrackStarError
from trackstar.store import StoreReader

IDENTITY = ("split", "input_sha256", "checkpoint_hash", "config", "d", "dtype")


def identity(store: StoreReader) -> dict:
    """What names a store's rows: its input file's hash, the checkpoint, the encoding config."""
    return json.loads(json.dumps({k: store.attrs.get(k) for k in IDENTITY}, sort_keys=True))


def save_partial(path: str | Path, sums: list[np.ndarray], n: int, blocks: list[tuple[int, int]],
                 store: StoreReader, norm4: np.ndarray) -> None:
    """The sums as float32 tensors sum.<i> (the stats they feed are float32) with n, blocks, the per-block sums
    of ||g_b||^4 (the Ledoit-Wolf damping's statistic) and the store's identity as metadata; written to a temp
    name, then renamed."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    info = {"n": n, "blocks": [list(b) for b in blocks], "store": identity(store),
            "norm4": [float(v) for v in norm4]}
    save_file({f"sum.{i}": np.ascontiguousarray(s, dtype=np.float32) for i, s in enumerate(sums)}, str(tmp),
              metadata={"info": json.dumps(info, sort_keys=True)})
    os.replace(tmp, path)


def partial_blocks(path: str | Path) -> list[tuple[int, int]]:
    """The Hessian blocks a partial was computed for."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return [tuple(b) for b in json.loads(f.metadata()["info"])["blocks"]]


def add_partial(path: str | Path, sums: list[np.ndarray], blocks: list[tuple[int, int]], store: StoreReader,
                norm4: np.ndarray) -> int:
    """sums += the file's sums (float64, in place), norm4 += its ||g_b||^4 sums; returns its row count. Refuses
    a file computed from other rows or blocks than `store` and `blocks`."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        info = json.loads(f.metadata()["info"])
        if info["store"] != identity(store):
            raise ArtifactMismatch(f"{path}: computed from other encodings than {store.path}; run `dvc repro`")
        if [tuple(b) for b in info["blocks"]] != [tuple(b) for b in blocks]:
            raise ArtifactMismatch(f"{path}: blocks {info['blocks']} differ from {blocks}; run `dvc repro`")
        for i, s in enumerate(sums):
            s += f.get_tensor(f"sum.{i}")
    norm4 += np.asarray(info["norm4"], dtype=np.float64)
    return int(info["n"])


def partial_paths(folder: str | Path, shards: list[str]) -> list[Path]:
    """One partial per shard, by name; refuses a file in `folder` that is no listed shard's (a removed shard's
    sums left behind would change what DVC hashes)."""
    names = sorted(shards)
    stray = sorted(p.name for p in Path(folder).glob("*.safetensors") if p.stem not in names)
    if stray:
        raise TrackStarError(f"{Path(folder) / stray[0]}: not a shard in params.yaml data.shards (a removed shard's "
                             f"sums); delete it")
    return [Path(folder) / f"{n}.safetensors" for n in names]
