"""DVC stage `autocorrelation`: R_train and R_eval, the Gauss-Newton Hessian statistics (DESIGN §2
step 4). Under torchrun each rank sums its own chunks and an all-reduce adds them up."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.numpy import save_file

from trackstar.config import load_params
from trackstar.hessian import autocorrelation, autocorrelation_sums
from trackstar.partials import add_partial, partial_paths, save_partial
from trackstar.runner import run_main
from trackstar.store import ConcatReader, StoreReader, corpus_stores

OUT = Path("hessian/stats.safetensors")


def all_reduce_sum(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.numpy()


def shard_partial(name: str) -> None:
    """`autocorrelation_shard@<name>`: one shard's unnormalized sums, computed once (docs/shards.md)."""
    store = StoreReader(f"encodings/raw/shards/{name}.zarr")
    blocks = [(0, store.d)]
    sums, n = autocorrelation_sums((x for _, x in store.iter_chunks()), blocks)
    save_partial(f"hessian/partials/{name}.safetensors", sums, n, blocks, store)
    print(json.dumps({"shard": name, "rows": n, "d": store.d}))


def shards_r_train(train: ConcatReader, shards: list[str], rank: int, world: int, reduce) -> tuple[np.ndarray, int]:
    """R_train = (the corpus's sums, over this rank's chunks, all-reduced + every shard's partial sums) / N."""
    blocks = [(0, train.d)]
    sums, n = autocorrelation_sums((x for _, x in train.parts[0].iter_chunks(rank, world)), blocks)
    if reduce is not None:
        sums = [reduce(x) for x in sums]
        n = int(reduce(np.array([n], dtype=np.float64))[0])
    for path, store in zip(partial_paths("hessian/partials", shards), train.parts[1:]):
        n += add_partial(path, sums, blocks, store)
    return sums[0] / n, n


def main() -> None:
    if sys.argv[1:2] == ["shard"]:
        return shard_partial(sys.argv[2])
    params = load_params()
    h = params.hessian
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    reduce = None
    if world > 1:
        dist.init_process_group("gloo")
        reduce = all_reduce_sum
    train = ConcatReader(corpus_stores("encodings/raw/train.zarr", "encodings/raw/shards", params.data.shards))
    query = StoreReader("encodings/raw/query.zarr", expect={k: train.attrs[k] for k in ("d", "checkpoint_hash", "config")})
    if params.data.shards and not h.train_sample:  # each shard's rows enter through its partial sums
        r_train, n_train = shards_r_train(train, sorted(params.data.shards), rank, world, reduce)
    else:
        r_train, n_train = autocorrelation((x for _, x in train.iter_chunks(rank, world, h.train_sample)), train.d,
                                           reduce)
    r_eval, n_eval = autocorrelation((x for _, x in query.iter_chunks(rank, world)), query.d, reduce)
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return
    OUT.parent.mkdir(exist_ok=True)
    meta = {"n_train": n_train, "n_eval": n_eval, "d": train.d, "train_sample": h.train_sample,
            "trace_train": float(np.trace(r_train)), "trace_eval": float(np.trace(r_eval)),
            "checkpoint_hash": train.attrs["checkpoint_hash"], "encode_config": train.attrs["config"],
            "train_input_sha256": train.attrs["input_sha256"], "query_input_sha256": query.attrs["input_sha256"]}
    tmp = OUT.with_suffix(".tmp")
    save_file({"r_train": r_train.astype(np.float32), "r_eval": r_eval.astype(np.float32)}, str(tmp),
              metadata={"meta": json.dumps(meta, sort_keys=True)})
    os.replace(tmp, OUT)
    print(json.dumps({"n_train": n_train, "n_eval": n_eval, "d": train.d}))


if __name__ == "__main__":
    run_main(main)
