"""DVC stage `retrieve`: TrackStar proponents/opponents from the index, plus the ablation-ladder
methods by streaming exact search over the raw store (encodings computed once, shared by all rungs)."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from trackstar.config import load_params
from trackstar.data import iter_corpus, read_queries
from trackstar.hessian import whiten
from trackstar.index import load_index, search, valid_hits
from trackstar.results import make_result, write_results
from trackstar.retrieve import exact_search
from trackstar.runner import run_main
from trackstar.store import StoreReader

# rung -> (raw array, whitening matrix key or None, unit-normalize)
LADDER = {"dot": ("g_plain", None, False), "cosine": ("g_plain", None, True), "optimizer": ("g", None, True),
          "r_train": ("g", "w_train", True)}


def passage_lookup(rows: set[int]) -> dict[int, tuple[str, str]]:
    """(id, text) of the needed corpus rows, in one streaming pass."""
    out = {}
    for i, p in enumerate(iter_corpus("data/corpus.jsonl")):
        if i in rows:
            out[i] = (p.id, p.text)
    return out


def write(path: Path, queries, top_s, top_i, bot_s, bot_i, lookup, **extra) -> None:
    results = []
    for qi, q in enumerate(queries):
        (ts, ti), (bs, bi) = valid_hits(top_s[qi], top_i[qi]), valid_hits(bot_s[qi], bot_i[qi])
        results.append(make_result(q.id, q.prompt, q.target, [lookup[r][0] for r in ti], ts,
                                   {lookup[r][0]: lookup[r][1] for r in np.concatenate([ti, bi])}.__getitem__,
                                   [lookup[r][0] for r in bi], bs, **extra))
    write_results(path, results)


def main() -> None:
    params = load_params()
    r, ix = params.retrieve, params.index
    t0 = time.time()
    queries = read_queries("data/queries.jsonl")
    final_train = StoreReader("encodings/final/train.zarr")
    final_query = StoreReader("encodings/final/query.zarr", expect={"hessian_sha256": final_train.attrs["hessian_sha256"]})
    index, meta = load_index("index", expect={"hessian_sha256": final_train.attrs["hessian_sha256"],
                                              "rows": final_train.n})
    k = min(r.k, final_train.n)
    found = {"trackstar": search(index, final_query.read_all(), k, ix.nprobe, ix.rerank, final_train)}
    short = int((found["trackstar"][1] < 0).any(axis=1).sum())
    if short:
        print(f"warning: {short} queries got fewer than k={k} index hits (probed IVF lists too small); "
              f"raise index.nprobe (now {ix.nprobe}) or lower index.nlist", flush=True)

    w = load_file("hessian/hessian.safetensors")
    for method in r.methods:
        array, wkey, norm = LADDER[method]
        train = StoreReader("encodings/raw/train.zarr", array=array)
        qx = StoreReader("encodings/raw/query.zarr", array=array).read_all()
        wm = w[wkey] if wkey else None
        qx = whiten(qx, wm, norm)
        found[method] = exact_search(qx, train.iter_chunks(), k, transform=lambda x, wm=wm, norm=norm: whiten(x, wm, norm),
                                     query_batch=r.query_batch, total_rows=train.n)

    rows = set()
    for ts, ti, bs, bi in found.values():
        rows.update(ti[ti >= 0].tolist())
        rows.update(bi[bi >= 0].tolist())
    lookup = passage_lookup(rows)
    ladder = Path("retrievals/ladder")
    shutil.rmtree(ladder, ignore_errors=True)
    ladder.mkdir(parents=True)
    for method, res in found.items():
        path = Path("retrievals/trackstar.jsonl") if method == "trackstar" else ladder / f"{method}.jsonl"
        write(path, queries, *res, lookup, query_set=method)
    print(json.dumps({"queries": len(queries), "methods": ["trackstar", *r.methods], "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    run_main(main)
