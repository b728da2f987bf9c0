"""DVC stage `ladder`: the ablation-ladder rungs (docs/method.md) by streaming exact search over the raw
store, each whitened on the fly: dot, cosine (plain gradients), optimizer (corrected), r_train
(corrected, whitened by R_train alone, damped by hessian.damping, in the `eigen` stage's basis). A
`hessian.mix_k` / `lambda` edit leaves their inputs unchanged."""

import json
import time

from trackstar import layout
from trackstar.atomic import atomic_dir
from trackstar.config import load_params
from trackstar.data.records import corpus_files, read_queries
from trackstar.retrieval.ladder import ladder_search
from trackstar.retrieval.results import write_retrievals
from trackstar.runner import run_main


def main() -> None:
    params = load_params()
    t0 = time.time()
    queries = read_queries(layout.QUERIES)
    with atomic_dir(layout.LADDER) as out:
        for method, found in ladder_search(params):
            write_retrievals(out / f"{method}.jsonl", queries, found, corpus_files(), method)
    print(json.dumps({"queries": len(queries), "methods": params.retrieve.methods,
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    run_main(main)
