"""DVC stage `autocorrelation`: the diagonal blocks of R_train and R_eval, the Gauss-Newton Hessian statistics
(DESIGN §2 step 4), in the structure the memory plan picks from hessian.structure / hessian.memory_gb (refused
before any work if none fits). Under torchrun each rank sums its own chunks and an all-reduce adds them up."""

import json
import os
import sys
from pathlib import Path

import numpy as np

from trackstar.config import EncodeParams, load_params
from trackstar.hessian import autocorrelation, norm4_sums, save_stats
from trackstar.plan import plan
from trackstar.runner import run_main
from trackstar.store import StoreReader

OUT = Path("hessian/stats.safetensors")


def all_reduce_sum(x: np.ndarray) -> np.ndarray:
    """Sum over the torchrun processes, in place."""
    import torch
    import torch.distributed as dist

    t = torch.from_numpy(np.ascontiguousarray(x))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.numpy()


def main() -> None:
    h = load_params().hessian
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    train = StoreReader("encodings/raw/train.zarr")
    query = StoreReader("encodings/raw/query.zarr", expect={k: train.attrs[k] for k in ("d", "checkpoint_hash", "config")})
    p = plan(train.attrs["layout"], train.n, query.n, h, EncodeParams(**train.attrs["encode"]))
    if rank == 0:
        print(p.text(), file=sys.stderr)
    chosen = p.require()
    blocks = chosen.blocks
    eval_idx = [i for i, (a, b) in enumerate(blocks) if b - a <= query.n]  # the blocks eigen decomposes R_eval of
    reduce = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        reduce = all_reduce_sum
    # per block: the sum of ||g_b||^4 over the rows, for the Ledoit-Wolf damping (hessian.damping=auto)
    s4 = np.zeros(len(blocks))

    def tapped():
        for _, x in train.iter_chunks(rank, world, h.train_sample):
            s4[:] += norm4_sums(x, blocks)
            yield x

    r_train, n_train = autocorrelation(tapped(), blocks, reduce)
    if reduce is not None:
        s4[:] = reduce(s4)
    r_eval, n_eval = ([], query.n) if not eval_idx else autocorrelation(
        (x for _, x in query.iter_chunks(rank, world)), [blocks[i] for i in eval_idx], reduce)
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return
    OUT.parent.mkdir(exist_ok=True)
    meta = {"n_train": n_train, "n_eval": n_eval, "d": train.d, "train_sample": h.train_sample,
            "structure": chosen.structure, "blocks": [list(b) for b in blocks],
            "chunk_rows": [train.chunk_rows, query.chunk_rows],  # with the blocks: the memory estimate (plan.estimate)
            "trace_train": float(sum(np.trace(r) for r in r_train)),
            "norm4_train": [float(v) / n_train for v in s4],  # per block: mean ||g_b||^4
            "checkpoint_hash": train.attrs["checkpoint_hash"], "encode_config": train.attrs["config"],
            "train_input_sha256": train.attrs["input_sha256"], "query_input_sha256": query.attrs["input_sha256"]}
    save_stats(OUT, r_train, dict(zip(eval_idx, r_eval)), meta)
    print(json.dumps({"n_train": n_train, "n_eval": n_eval, "d": train.d, "structure": chosen.structure,
                      "blocks": len(blocks)}))


if __name__ == "__main__":
    run_main(main)
