"""DVC stage `autocorrelation`: R_train and R_eval, the Gauss-Newton Hessian statistics (docs/method.md,
step 4). Under torchrun each rank sums its own chunks and an all-reduce adds them up."""

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.numpy import save_file

from trackstar.config import load_params
from trackstar.hessian import autocorrelation
from trackstar.runner import run_main
from trackstar.store import StoreReader

OUT = Path("hessian/stats.safetensors")


def all_reduce_sum(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.numpy()


def main() -> None:
    h = load_params().hessian
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    reduce = None
    if world > 1:
        dist.init_process_group("gloo")
        reduce = all_reduce_sum
    train = StoreReader("encodings/raw/train.zarr")
    query = StoreReader("encodings/raw/query.zarr", expect={k: train.attrs[k] for k in ("d", "checkpoint_hash", "config")})
    r_train, n_train = autocorrelation((x for _, x in train.iter_chunks(rank, world, h.train_sample)), train.d, reduce)
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
