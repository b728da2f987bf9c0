"""Attribution metrics of the default pipeline under ANN index configs, against flat, with their noise.

Reads a repo after `dvc repro` (its `encodings/final` stores and `data/`), builds each index config
with the library (`trackstar.index`), retrieves the top k with the same search the `retrieve` stage
runs, and scores TrackStar's rankings with `trackstar.evaluate` (MRR, recall@10). "Within noise": the
paired-bootstrap 95 % interval of MRR(config) - MRR(flat) (queries resampled) lies inside +-h, h the
half-width of flat MRR's own 95 % bootstrap interval (the metric's sampling noise on these queries).
Tail-patch needs the model and runs only in `evaluate` (`dvc exp run`, see benchmarks/README).
Writes benchmarks/results/pipeline_ann.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from trackstar.config import IndexParams
from trackstar.data.records import iter_corpus, read_queries
from trackstar.evaluation.metrics import mrr, recall_at_k
from trackstar.retrieval.index import build_index, factory_string, search
from trackstar.store import StoreReader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import write_results  # noqa: E402
from common import recall_at_10, show  # noqa: E402

HERE = Path(__file__).resolve().parent
# (build params, nprobe, rerank); the first carries the benchmark's in-distribution winner to 3,200 rows
CONFIGS = [
    (dict(kind="ivf_pq", nlist=64, pq_m=1856, pq_bits=4), 16, 300),
    (dict(kind="ivf_flat", nlist=64), 16, 0),
    (dict(kind="ivf_flat", nlist=64), 32, 0),
    (dict(kind="pq", pq_m=1856, pq_bits=4), 1, 300),
    (dict(kind="pq", pq_m=1856, pq_bits=4), 1, 1000),
    (dict(kind="pq", pq_m=3712, pq_bits=4), 1, 300),
    (dict(kind="pq", pq_m=3712, pq_bits=4), 1, 1000),
    # index.pca at the passages' rank (3,200 here): lossless, and the codes' error stays inside the span
    (dict(kind="flat", pca=3200), 1, 0),
    (dict(kind="pq", pq_m=800, pq_bits=4, pca=3200), 1, 100),
    (dict(kind="pq", pq_m=800, pq_bits=4, pca=3200), 1, 300),
    (dict(kind="ivf_pq", nlist=64, pq_m=800, pq_bits=4, pca=3200), 16, 300),
]


def paired_interval(ranked: list, base: list, relevant: list, boots: int, seed: int) -> list[float]:
    """95 % bootstrap interval of mrr(ranked) - mrr(base), resampling queries (the same ones for both)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(boots):
        ix = rng.integers(0, len(ranked), len(ranked))
        rel = [relevant[i] for i in ix]
        diffs.append(mrr([ranked[i] for i in ix], rel) - mrr([base[i] for i in ix], rel))
    return [float(x) for x in np.percentile(diffs, [2.5, 97.5])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=".", help="a repo after `dvc repro`")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--boots", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results/pipeline_ann.json"))
    args = ap.parse_args()
    repo = Path(args.repo)
    store = StoreReader(repo / "encodings/final/train.zarr")
    q = StoreReader(repo / "encodings/final/query.zarr").read_all()
    queries = read_queries(repo / "data/queries.jsonl")
    ids = np.array([p.id for p in iter_corpus(repo / "data/corpus.jsonl")])
    relevant = [set(x.relevant_ids or []) for x in queries]

    def run(build: dict, nprobe: int, rerank: int) -> dict:
        t = time.perf_counter()
        index = build_index(store, IndexParams(**build), progress=False)
        built = time.perf_counter() - t
        t = time.perf_counter()
        _, rows, _, _ = search(index, q, args.k, nprobe, rerank, store)
        return {"rows": rows, "build_s": built, "search_s": time.perf_counter() - t, "index": index}

    flat = run(dict(kind="flat"), 1, 0)
    base = [list(ids[r[r >= 0]]) for r in flat["rows"]]
    out = {"repo": str(repo), "rows": store.n, "d": store.d, "queries": len(q), "k": args.k,
           "flat": {"mrr": mrr(base, relevant), "recall@10": recall_at_k(base, relevant, 10),
                    # against empty rankings (MRR 0): the bootstrap interval of flat's own MRR
                    "mrr_95ci": paired_interval(base, [[] for _ in base], relevant, args.boots, args.seed)},
           "configs": []}
    noise = (out["flat"]["mrr_95ci"][1] - out["flat"]["mrr_95ci"][0]) / 2
    for build, nprobe, rerank in CONFIGS:
        c = {"nlist": 64, "pq_m": 64, "pq_bits": 8, "opq": False, **build}
        res = run(c, nprobe, rerank)
        ranked = [list(ids[r[r >= 0]]) for r in res["rows"]]
        pca = c.get("pca", 0)
        row = {"factory": (f"pca={pca} → " if pca else "")
                          + factory_string(IndexParams(**c), pca or store.d),
               # serialized size: codes, lists, quantizers and transforms
               "index_bytes_per_row": int(faiss.serialize_index(res["index"]).size) / store.n,
               "nprobe": nprobe, "rerank": rerank, "mrr": mrr(ranked, relevant),
               "recall@10": recall_at_k(ranked, relevant, 10), "recall_at_10_vs_exact": recall_at_10(flat["rows"], res["rows"]),
               "mrr_minus_flat_95ci": paired_interval(ranked, base, relevant, args.boots, args.seed),
               "build_s": res["build_s"], "search_s": res["search_s"]}
        row["within_noise"] = bool(-noise <= row["mrr_minus_flat_95ci"][0] and row["mrr_minus_flat_95ci"][1] <= noise)
        row["index_bytes_ratio"] = row["index_bytes_per_row"] / (store.d * 4)
        out["configs"].append(row)
        print(f"{row['factory']} nprobe {nprobe} rerank {rerank}: MRR {row['mrr']:.4f}", flush=True)
    show("pipeline_ann", write_results(Path(args.out), vars(args), out))


if __name__ == "__main__":
    main()
