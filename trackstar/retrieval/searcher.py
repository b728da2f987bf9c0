"""TrackStar's search over the final store, as the `index` stage left it: `index.kind: flat` (without
`index.pca`) is the store itself, searched exactly by streaming its chunks with a running top-k
(`exact.exact_search`), so no N × d copy is ever held; the ANN kinds are a FAISS index file
(`index.py`). Queries are read from their store in blocks of `retrieve.query_batch` rows."""

from __future__ import annotations

import json

import numpy as np

from trackstar import layout
from trackstar.atomic import atomic_write_text
from trackstar.config import IndexParams, Params
from trackstar.retrieval.exact import Found, exact_search, search_blocks
from trackstar.retrieval.index import build_index, factory_string, load_index, read_meta, save_index, search
from trackstar.store import ConcatReader, StoreReader


def streamed(p: IndexParams) -> bool:
    """Whether the index is the final store itself: exact search streamed over its chunks (kind flat, no pca)."""
    return p.kind == "flat" and not p.pca


def write_index(p: IndexParams, root: layout.Root = ".") -> dict:
    """The `index` stage: index/meta.json (what was indexed: rows, d, checkpoint, whitening_id, config) and,
    for an ANN kind or pca, the FAISS index built from the final train store; for `flat` the meta names
    the store that `retrieve` searches in place. Returns the meta."""
    store = StoreReader(layout.final_store("train", root))
    out = layout.at(layout.INDEX, root)
    meta = {"kind": p.kind, "on_disk": p.on_disk, "pca": p.pca, "rows": store.n, "d": store.d,
            "checkpoint_hash": store.attrs["checkpoint_hash"], "whitening_id": store.attrs["whitening_id"],
            "config": store.attrs["config"]}
    if streamed(p):
        meta["store"] = layout.final_store("train").as_posix()  # relative to the repository root
        atomic_write_text(out / "meta.json", json.dumps(meta, indent=2, sort_keys=True))
    else:
        meta["factory"] = factory_string(p, p.pca or store.d)
        save_index(build_index(store, p, out), out, meta)
    return meta


class Searcher:
    """The `index` stage's output opened for the final train `store` it was built from (refused when its
    whitening_id or rows differ): `search` gives the exact or ANN top-k and bottom-k of query rows."""

    def __init__(self, store: StoreReader, params: Params, root: layout.Root = "."):
        path = layout.at(layout.INDEX, root)
        expect = {"whitening_id": store.attrs["whitening_id"], "rows": store.n}
        self.meta = read_meta(path, expect)
        self.index = None if "store" in self.meta else load_index(path)[0]
        self.store, self.params = store, params

    def search(self, queries: np.ndarray, k: int) -> Found:
        """(top scores, top rows, bottom scores, bottom rows), each [Q, min(k, rows)]; an IVF search whose
        probed lists hold too few rows pads with row -1 (`index.search`)."""
        k = min(k, self.store.n)
        if self.index is None:
            return exact_search(queries, self.store.iter_chunks(), k, query_batch=self.params.retrieve.query_batch)
        ix = self.params.index
        return search(self.index, queries, k, ix.nprobe, ix.rerank, self.store)


def trackstar_search(params: Params, root: layout.Root = ".") -> Found:
    """The `retrieve` stage: every row of the final query store against the final train store, one block of
    retrieve.query_batch query rows at a time (for `flat`, one streamed pass over the train store each)."""
    train = StoreReader(layout.final_store("train", root))
    query = ConcatReader([layout.final_store("query", root)], expect={"whitening_id": train.attrs["whitening_id"]})
    searcher = Searcher(train, params, root)
    return search_blocks(query, params.retrieve.query_batch, lambda q: searcher.search(q, params.retrieve.k))
