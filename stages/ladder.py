"""DVC stage `ladder`: the ablation-ladder rungs (docs/method.md) by streaming exact search over the raw
store, each whitened on the fly: dot, cosine (plain gradients), optimizer (corrected), r_train
(corrected, whitened by R_train alone, damped by hessian.damping, in the `eigen` stage's basis). A
`hessian.mix_k` / `lambda` edit leaves their inputs unchanged."""

import json
import shutil
import time
from pathlib import Path

from trackstar.config import load_params
from trackstar.data.records import corpus_files, read_queries
from trackstar.hessian.whitening import block_dampings, load_basis, train_whitening, whiten
from trackstar.retrieval.results import write_retrievals
from trackstar.retrieval.exact import exact_search
from trackstar.runner import run_main
from trackstar.store import ConcatReader, StoreReader, corpus_stores

# rung -> (raw array, uses W_train, unit-normalize)
LADDER = {"dot": ("g_plain", False, False), "cosine": ("g_plain", False, True), "optimizer": ("g", False, True),
          "r_train": ("g", True, True)}
OUT = Path("retrievals/ladder")


def main() -> None:
    params = load_params()
    r = params.retrieve
    t0 = time.time()
    queries = read_queries("data/queries.jsonl")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    w_train = None
    if "r_train" in r.methods:
        blocks, basis = load_basis("hessian/eigen.safetensors")
        w_train = train_whitening(blocks, block_dampings(blocks, params.hessian.damping, basis["n_train"]))
    for method in r.methods:
        array, whitened, norm = LADDER[method]
        train = ConcatReader(corpus_stores("encodings/raw/train.zarr", "encodings/raw/shards", params.data.shards), array)
        query = StoreReader("encodings/raw/query.zarr", array=array, expect={"checkpoint_hash": train.attrs["checkpoint_hash"]})
        w = w_train if whitened else None
        found = exact_search(whiten(query.read_all(), w, norm), train.iter_chunks(), min(r.k, train.n),
                             transform=lambda x, w=w, norm=norm: whiten(x, w, norm), query_batch=r.query_batch,
                             total_rows=train.n)
        write_retrievals(OUT / f"{method}.jsonl", queries, found, corpus_files(), method)
    print(json.dumps({"queries": len(queries), "methods": r.methods, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    run_main(main)
