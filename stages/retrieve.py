"""DVC stage `retrieve`: TrackStar proponents/opponents of every query from the index (ANN
candidates re-scored exactly from the final store when index.rerank > 0)."""

import json
import time

from trackstar import layout
from trackstar.config import load_params
from trackstar.data.records import corpus_files, read_queries
from trackstar.retrieval.index import load_index, search
from trackstar.retrieval.results import write_retrievals
from trackstar.runner import run_main
from trackstar.store import StoreReader


def main() -> None:
    params = load_params()
    r, ix = params.retrieve, params.index
    t0 = time.time()
    queries = read_queries(layout.QUERIES)
    train = StoreReader(layout.final_store("train"))
    query = StoreReader(layout.final_store("query"), expect={"whitening_id": train.attrs["whitening_id"]})
    index, _ = load_index(layout.INDEX, expect={"whitening_id": train.attrs["whitening_id"], "rows": train.n})
    k = min(r.k, train.n)
    found = search(index, query.read_all(), k, ix.nprobe, ix.rerank, train)
    short = int((found[1] < 0).any(axis=1).sum())
    if short:
        print(f"warning: {short} queries got fewer than k={k} index hits (probed IVF lists too small); "
              f"raise index.nprobe (now {ix.nprobe}) or lower index.nlist", flush=True)
    write_retrievals(layout.TRACKSTAR, queries, found, corpus_files(), "trackstar")
    print(json.dumps({"queries": len(queries), "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    run_main(main)
