"""The `autocorrelation` stage's work: the diagonal blocks of R_train and R_eval from the raw stores, in the
structure the memory plan picks (refused before any work if none fits). Under torchrun each rank sums its own
chunks and an all-reduce adds them up. A corpus shard's rows enter through its partial sums, computed once per
shard (`shard_partial`); a partial made for other blocks is summed again from its store."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trackstar import layout
from trackstar.config import EncodeParams, Params
from trackstar.data.records import corpus_files, count_lines
from trackstar.distributed import Ranks
from trackstar.hessian.partials import add_partial, partial_blocks, save_partial
from trackstar.hessian.plan import plan
from trackstar.hessian.stats import Sums, autocorrelation
from trackstar.store import ConcatReader, StoreReader


@dataclass
class Gathered:
    """What the `autocorrelation` stage writes: R_train's blocks, R_eval's decomposable blocks by index, meta."""
    r_train: list[np.ndarray]
    r_eval: dict[int, np.ndarray]
    meta: dict

    def summary(self) -> dict:
        m = self.meta
        return {"n_train": m["n_train"], "n_eval": m["n_eval"], "d": m["d"], "structure": m["structure"],
                "blocks": len(m["blocks"])}


def shard_partial(name: str, params: Params, root: str | Path = ".") -> dict:
    """`autocorrelation_shard@<name>`: one shard's unnormalized sums in the structure the plan picks for the
    whole corpus (its rows counted from data/), saved to its partial file; returns a summary."""
    store = StoreReader(layout.raw_shard_store(name, root))
    n_train = sum(count_lines(f) for f in corpus_files(layout.at(layout.DATA, root)))
    blocks = plan(store.attrs["layout"], n_train, count_lines(layout.at(layout.QUERIES, root)), params.hessian,
                  EncodeParams(**store.attrs["encode"])).require().blocks
    sums = Sums.of_rows((x for _, x in store.iter_chunks()), blocks)
    save_partial(layout.partial(name, root), sums, blocks, store)
    return {"shard": name, "rows": sums.n, "d": store.d, "blocks": len(blocks)}


def missing_partials(params: Params, root: str | Path = ".") -> list[str]:
    """The listed shards without a partial file, by name."""
    return [n for n in sorted(params.data.shards) if not layout.partial(n, root).exists()]


def _train_sums(train: ConcatReader, partials: list[Path] | None, blocks: list[tuple[int, int]], ranks: Ranks,
                sample: int) -> Sums:
    """R_train's statistics, summed over the ranks: with `partials` (one per shard part of `train`), the corpus's
    own rows plus each shard's partial sums; else every row (the first `sample` when > 0)."""
    if partials is None:
        sums = Sums.of_rows((x for _, x in train.iter_chunks(ranks.rank, ranks.world, sample)), blocks)
        sums.all_reduce(ranks.reduce)
        return sums
    sums = Sums.of_rows((x for _, x in train.parts[0].iter_chunks(ranks.rank, ranks.world)), blocks)
    sums.all_reduce(ranks.reduce)
    for path, store in zip(partials, train.parts[1:]):
        if partial_blocks(path) == [tuple(b) for b in blocks]:
            add_partial(path, sums, blocks, store)
        else:
            print(f"{path}: made for other Hessian blocks; summing {store.path} again", file=sys.stderr)
            sums.add_rows((x for _, x in store.iter_chunks()), blocks)
    return sums


def gather_stats(params: Params, ranks: Ranks = Ranks(), root: str | Path = ".") -> Gathered | None:
    """R_train's and R_eval's blocks with the meta `eigen` reads; None on ranks other than 0. With world > 1 the
    ranks' process group (nccl on CUDA, gloo on the CPU) is up for the sums only."""
    h, shards = params.hessian, sorted(params.data.shards)
    train = ConcatReader(layout.corpus_stores(shards, root))
    query = StoreReader(layout.raw_store("query", root),
                        expect={k: train.attrs[k] for k in ("d", "checkpoint_hash", "config")})
    p = plan(train.attrs["layout"], train.n, query.n, h, EncodeParams(**train.attrs["encode"]))
    if ranks.rank == 0:
        print(p.text(), file=sys.stderr)
    chosen = p.require()
    blocks = chosen.blocks
    eval_idx = [i for i, (a, b) in enumerate(blocks) if b - a <= query.n]  # the blocks eigen decomposes R_eval of
    partials = layout.shard_partials(shards, root) if shards and not h.train_sample else None
    with ranks.group():
        sums = _train_sums(train, partials, blocks, ranks, h.train_sample)
        r_train, n_train = sums.normalized(), sums.n
        r_eval, n_eval = ([], query.n) if not eval_idx else autocorrelation(
            (x for _, x in query.iter_chunks(ranks.rank, ranks.world)), [blocks[i] for i in eval_idx], ranks.reduce)
    if ranks.rank != 0:
        return None
    meta = {"n_train": n_train, "n_eval": n_eval, "d": train.d, "train_sample": h.train_sample,
            "structure": chosen.structure, "blocks": [list(b) for b in blocks],
            "chunk_rows": [train.parts[0].chunk_rows, query.chunk_rows],  # with the blocks: the memory estimate
            "trace_train": float(sum(np.trace(r) for r in r_train)),
            "norm4_train": [float(v) / n_train for v in sums.norm4],  # per block: mean ||g_b||^4
            "checkpoint_hash": train.attrs["checkpoint_hash"], "encode_config": train.attrs["config"],
            "train_input_sha256": train.attrs["input_sha256"], "query_input_sha256": query.attrs["input_sha256"]}
    return Gathered(r_train, dict(zip(eval_idx, r_eval)), meta)
