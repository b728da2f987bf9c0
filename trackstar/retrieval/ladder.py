"""The ablation-ladder rungs (docs/method.md, `trackstar.methods`): which raw array each scores, whether R_train
whitens it and whether rows are unit-normalized; searched exactly by one streaming pass over the raw corpus
store per block of retrieve.query_batch query rows (read from the raw query store, never whole)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from trackstar import layout
from trackstar.config import Params
from trackstar.hessian.whitening import Whitening, block_dampings, load_basis, train_whitening, whiten
from trackstar.methods import RUNGS
from trackstar.retrieval.exact import Found, exact_search, search_blocks
from trackstar.store import ConcatReader


def rung_search(rung: str, queries: np.ndarray, train: ConcatReader, w_train: Whitening | None, k: int,
                query_batch: int = 1024) -> Found:
    """(top scores, top rows, bottom scores, bottom rows) of one rung for raw query rows of its array; `train`
    reads that array of the corpus; `w_train` is needed by r_train only."""
    r = RUNGS[rung]
    w = w_train if r.whitened else None
    return exact_search(whiten(queries, w, r.normalize), train.iter_chunks(), min(k, train.n),
                        transform=lambda x: whiten(x, w, r.normalize), query_batch=query_batch)


def train_whitening_of(params: Params, root: str | Path = ".") -> Whitening:
    """W_train of the r_train rung: R_train alone in the `eigen` stage's basis, damped by hessian.damping."""
    blocks, basis = load_basis(layout.at(layout.EIGEN, root))
    return train_whitening(blocks, block_dampings(blocks, params.hessian.damping, basis["n_train"]))


def ladder_search(params: Params, root: str | Path = ".") -> Iterator[tuple[str, Found]]:
    """(rung, hits) for each rung of retrieve.methods, in order: exact search over the raw stores (the corpus
    and its shards), each whitened on the fly."""
    r = params.retrieve
    w_train = train_whitening_of(params, root) if any(RUNGS[m].whitened for m in r.methods) else None
    for method in r.methods:
        array = RUNGS[method].array
        train = ConcatReader(layout.corpus_stores(params.data.shards, root), array)
        query = ConcatReader([layout.raw_store("query", root)], array, {"checkpoint_hash": train.attrs["checkpoint_hash"]})
        yield method, search_blocks(query, r.query_batch,
                                    lambda q: rung_search(method, q, train, w_train, r.k, r.query_batch))
