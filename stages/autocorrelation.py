"""DVC stage `autocorrelation`: the diagonal blocks of R_train and R_eval, the Gauss-Newton Hessian statistics
(docs/method.md, step 4), in the structure the memory plan picks from hessian.structure / hessian.memory_gb (refused
before any work if none fits). Under torchrun each rank sums its own chunks and an all-reduce adds them up.
With corpus shards, each shard's rows enter through its partial sums (`autocorrelation_shard@<name>`, computed
once per shard: `python stages/autocorrelation.py shard NAME`; `... shards` makes every missing one)."""

import json
import os
import sys
from pathlib import Path

import numpy as np

from trackstar.config import EncodeParams, load_params
from trackstar.data.records import corpus_files, count_lines
from trackstar.hessian.whitening import autocorrelation, autocorrelation_sums, norm4_sums, normalize_sums, save_stats
from trackstar.hessian.partials import add_partial, partial_blocks, partial_paths, save_partial
from trackstar.hessian.plan import plan
from trackstar.runner import run_main
from trackstar.store import ConcatReader, StoreReader, corpus_stores

OUT = Path("hessian/stats.safetensors")


def tapped(chunks, blocks, s4: np.ndarray):
    """Pass row chunks through, adding each block's sum of ||g_b||^4 into s4 (the Ledoit-Wolf damping's
    one extra statistic, hessian.damping: auto)."""
    for _, x in chunks:
        s4 += norm4_sums(x, blocks)
        yield x


def all_reduce_sum(x: np.ndarray) -> np.ndarray:
    """Sum over the torchrun processes, in place."""
    import torch
    import torch.distributed as dist

    t = torch.from_numpy(np.ascontiguousarray(x))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.numpy()


def shard_partial(name: str) -> None:
    """`autocorrelation_shard@<name>`: one shard's unnormalized sums in the structure the plan picks for the
    whole corpus (its rows counted from data/), computed once per shard."""
    h = load_params().hessian
    store = StoreReader(f"encodings/raw/shards/{name}.zarr")
    n_train = sum(count_lines(f) for f in corpus_files())
    blocks = plan(store.attrs["layout"], n_train, count_lines("data/queries.jsonl"), h,
                  EncodeParams(**store.attrs["encode"])).require().blocks
    s4 = np.zeros(len(blocks))
    sums, n = autocorrelation_sums(tapped(store.iter_chunks(), blocks, s4), blocks)
    save_partial(f"hessian/partials/{name}.safetensors", sums, n, blocks, store, s4)
    print(json.dumps({"shard": name, "rows": n, "d": store.d, "blocks": len(blocks)}))


def shards_r_train(train: ConcatReader, shards: list[str], blocks, rank: int, world: int,
                   reduce, s4: np.ndarray) -> tuple[list[np.ndarray], int]:
    """R_train's blocks = (the corpus's sums, over this rank's chunks, all-reduced + every shard's partial
    sums) / N; s4 gathers the ||g_b||^4 sums alike. A partial made for other blocks (the plan chose another
    structure since) is recomputed here."""
    sums, n = autocorrelation_sums(tapped(train.parts[0].iter_chunks(rank, world), blocks, s4), blocks)
    if reduce is not None:
        sums = [reduce(x) for x in sums]
        n = int(reduce(np.array([n], dtype=np.float64))[0])
        s4[:] = reduce(s4)
    for path, store in zip(partial_paths("hessian/partials", shards), train.parts[1:]):
        if partial_blocks(path) == [tuple(b) for b in blocks]:
            n += add_partial(path, sums, blocks, store, s4)
        else:
            print(f"{path}: made for other Hessian blocks; summing {store.path} again", file=sys.stderr)
            more, m = autocorrelation_sums(tapped(store.iter_chunks(), blocks, s4), blocks)
            for s, x in zip(sums, more):
                s += x
            n += m
    return normalize_sums(sums, n), n


def main() -> None:
    if sys.argv[1:2] == ["shard"]:
        return shard_partial(sys.argv[2])
    if sys.argv[1:2] == ["shards"]:  # every listed shard without its partial, in one process (then `dvc commit`)
        for name in sorted(load_params().data.shards):
            if not Path(f"hessian/partials/{name}.safetensors").exists():
                shard_partial(name)
        return
    params = load_params()
    h = params.hessian
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    train = ConcatReader(corpus_stores("encodings/raw/train.zarr", "encodings/raw/shards", params.data.shards))
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
    s4 = np.zeros(len(blocks))  # per block: the sum of ||g_b||^4 over the rows (hessian.damping: auto)
    if params.data.shards and not h.train_sample:  # each shard's rows enter through its partial sums
        r_train, n_train = shards_r_train(train, sorted(params.data.shards), blocks, rank, world, reduce, s4)
    else:
        r_train, n_train = autocorrelation(tapped(train.iter_chunks(rank, world, h.train_sample), blocks, s4),
                                           blocks, reduce)
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
            "chunk_rows": [train.parts[0].chunk_rows, query.chunk_rows],  # with the blocks: the memory estimate
            "trace_train": float(sum(np.trace(r) for r in r_train)),
            "norm4_train": [float(v) / n_train for v in s4],  # per block: mean ||g_b||^4
            "checkpoint_hash": train.attrs["checkpoint_hash"], "encode_config": train.attrs["config"],
            "train_input_sha256": train.attrs["input_sha256"], "query_input_sha256": query.attrs["input_sha256"]}
    save_stats(OUT, r_train, dict(zip(eval_idx, r_eval)), meta)
    print(json.dumps({"n_train": n_train, "n_eval": n_eval, "d": train.d, "structure": chosen.structure,
                      "blocks": len(blocks)}))


if __name__ == "__main__":
    run_main(main)
