"""DVC stage `retrieve`: TrackStar proponents/opponents of every query, by exact search streamed over the
final train store (`index.kind: flat`) or from the FAISS index (ANN candidates re-scored exactly from the
final store when index.rerank > 0); queries read in blocks of retrieve.query_batch rows."""

import json
import time

from trackstar import layout
from trackstar.config import load_params
from trackstar.data.records import corpus_files, read_queries
from trackstar.retrieval.results import write_retrievals
from trackstar.retrieval.searcher import trackstar_search
from trackstar.runner import run_main


def main() -> None:
    params = load_params()
    t0 = time.time()
    queries = read_queries(layout.QUERIES)
    found = trackstar_search(params)
    short = int((found[1] < 0).any(axis=1).sum())
    if short:
        print(f"warning: {short} queries got fewer than k={found[1].shape[1]} index hits (probed IVF lists too "
              f"small); raise index.nprobe (now {params.index.nprobe}) or lower index.nlist", flush=True)
    write_retrievals(layout.TRACKSTAR, queries, found, corpus_files(), "trackstar")
    print(json.dumps({"queries": len(queries), "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    run_main(main)
