"""Retrieval at scale: FAISS index configs against streaming exact search, on >= 1M rows.

The pipeline's preconditioned encodings (`dvc repro` first) Gaussian-projected to --d dimensions, tiled to --rows
rows with per-copy noise of relative norm --sigma, unit-normalized. Query sets: `trackstar_queries`, the real
query encodings under the same projection, and `in_distribution`, perturbed copies of corpus rows (passage-to-
passage search). The ground truth is `exact_search` streaming over the store, timed in the same run. Each config
runs in its own process (its own peak RSS). Writes results/retrieval.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import peak_rss_mb, write_results  # noqa: E402
import common  # noqa: E402

HERE = Path(__file__).resolve().parent

# index name -> build params; each index is built once and searched with every (nprobe, rerank)
# in SEARCHES (search-time knobs, as in the pipeline: `retrieve` reads them, `index` does not)
INDEXES = {
    "flat": dict(kind="flat"),
    "ivf_flat": dict(kind="ivf_flat", nlist=1024),
    "ivf_pq": dict(kind="ivf_pq", nlist=1024, pq_m=128),
    "ivf_pq_on_disk": dict(kind="ivf_pq", nlist=1024, pq_m=128, on_disk=True),
    # no coarse quantizer: every code scanned (4-bit fast-scan, 128 bytes a row), then an exact rerank
    "ivf_pq_fastscan": dict(kind="ivf_pq", nlist=1024, pq_m=256, pq_bits=4),
    "pq_fastscan": dict(kind="pq", pq_m=256, pq_bits=4),
    # 2 bits a dimension (6.25 % of raw, over the 5 % budget): what TrackStar queries need (benchmarks/ann_ceiling.py)
    "pq_fastscan_2bit": dict(kind="pq", pq_m=512, pq_bits=4),
    "ivf_pq_fastscan_2bit": dict(kind="ivf_pq", nlist=1024, pq_m=512, pq_bits=4),
}
SEARCHES = {
    "flat": [(1, 0)],
    "ivf_flat": [(16, 0), (64, 0), (256, 0)],
    "ivf_pq": [(8, 0), (8, 100), (16, 200), (16, 600), (32, 1000), (64, 200), (256, 1000)],
    "ivf_pq_on_disk": [(16, 200)],
    "ivf_pq_fastscan": [(8, 100), (16, 100), (16, 200), (16, 250), (16, 300), (16, 400), (32, 200), (32, 300),
                        (64, 500), (256, 1000)],
    "pq_fastscan": [(1, 0), (1, 100), (1, 200), (1, 500), (1, 1000), (1, 2000), (1, 4000)],
    "pq_fastscan_2bit": [(1, 0), (1, 100), (1, 300), (1, 1000)],
    "ivf_pq_fastscan_2bit": [(64, 300), (256, 300)],
}
# query sets: the pipeline's real query encodings (nearly orthogonal to every passage: the hard,
# TrackStar case), and perturbed copies of corpus rows (in-distribution, as passage-to-passage search)
QUERY_SETS = ("trackstar_queries", "in_distribution")


def make_data(args) -> None:
    """The tiled, perturbed store and the query matrix, in --work (skipped if already there)."""
    from trackstar.store import StoreReader, StoreSpec

    work = Path(args.work)
    store_path = work / "train.zarr"
    if store_path.exists() and (work / "queries_in_distribution.npy").exists():
        return
    base = StoreReader(Path(args.repo) / "encodings/final/train.zarr").read_all()
    query = StoreReader(Path(args.repo) / "encodings/final/query.zarr").read_all()[: args.queries]
    rng = np.random.default_rng(args.seed)
    proj = rng.standard_normal((base.shape[1], args.d), dtype=np.float32) / np.sqrt(args.d)
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    base, query = norm(base @ proj), norm(query @ proj)
    np.save(work / "queries.npy", query.astype(np.float32))
    pick = rng.choice(len(base), size=args.queries, replace=False)
    near = base[pick] + args.sigma * rng.standard_normal((args.queries, args.d), dtype=np.float32) / np.sqrt(args.d)
    np.save(work / "queries_in_distribution.npy", norm(near).astype(np.float32))

    def rows(c: int, a: int, b: int) -> np.ndarray:
        noise = np.random.default_rng([args.seed, c]).standard_normal((b - a, args.d), dtype=np.float32)
        return norm(base[np.arange(a, b) % len(base)] + args.sigma * noise / np.sqrt(args.d))

    common.write_store(store_path, StoreSpec(args.rows, args.d, ["g"], chunk_mb=32.0, attrs={
        "benchmark": "retrieval", "source_rows": len(base), "sigma": args.sigma}), rows)


def timed(repeats: int, fn):
    """(median seconds of `repeats` calls, the last result): one timing on this shared machine varies by ±30 %."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), res


def query_file(work: Path, qset: str) -> Path:
    return work / ("queries.npy" if qset == "trackstar_queries" else f"queries_{qset}.npy")


def run_exact(args) -> dict:
    """Streaming exact top/bottom-k over the store, per query set: the baseline and the ground truth."""
    from trackstar.retrieval.exact import exact_search
    from trackstar.store import StoreReader

    work = Path(args.work)
    store = StoreReader(work / "train.zarr")
    for _ in store.iter_chunks():  # warm the page cache: the first timed set must not pay for a cold disk
        pass
    out = {}
    for qset in QUERY_SETS:
        q = np.load(query_file(work, qset))
        sec, (ts, ti, bs, bi) = timed(args.repeats, lambda: exact_search(q, store.iter_chunks(), args.k,
                                                                          query_batch=len(q)))
        np.save(work / f"exact_top_{qset}.npy", ti)
        np.save(work / f"exact_bottom_{qset}.npy", bi)
        out[qset] = {"search_s": sec, "qps": len(q) / sec, "top1_score_mean": float(ts[:, 0].mean()),
                     "top10_score_mean": float(ts[:, 9].mean())}
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_config(args, name: str) -> list[dict]:
    """Build one index from the store, then per search setting: search all queries (both
    directions) and compare with the exact ground truth."""
    from trackstar.config import IndexParams
    from trackstar.retrieval.index import build_index, load_index, save_index, search
    from trackstar.store import StoreReader

    c = {"nlist": 64, "pq_m": 64, "pq_bits": 8, "opq": False, "on_disk": False, **INDEXES[name]}
    work = Path(args.work)
    store = StoreReader(work / "train.zarr")
    out = work / f"index_{name}"
    t = time.perf_counter()
    index = build_index(store, IndexParams(**c, train_sample=args.train_sample), out, progress=False)
    save_index(index, out, {"on_disk": c["on_disk"]})
    build_s = time.perf_counter() - t
    index_bytes = sum(p.stat().st_size for p in out.iterdir() if p.suffix in (".faiss", ".ivfdata"))
    if c["on_disk"]:  # search the memory-mapped lists, as the retrieve stage would
        del index
        index, _ = load_index(out)
    rows = []
    for qset in QUERY_SETS:
        q = np.load(query_file(work, qset))
        top, bottom = np.load(work / f"exact_top_{qset}.npy"), np.load(work / f"exact_bottom_{qset}.npy")
        for nprobe, rerank in SEARCHES[name]:
            search(index, q[:8], args.k, nprobe, rerank, store)  # warm-up (threads, page cache)
            sec, (ts, ti, bs, bi) = timed(args.repeats, lambda: search(index, q, args.k, nprobe, rerank, store))
            rows.append({"name": f"{name} nprobe={nprobe} rerank={rerank}", "index": name, "queries": qset,
                         "config": {**c, "nprobe": nprobe, "rerank": rerank}, "factory": _factory(c, store.d),
                         "build_s": build_s, "search_s": sec, "qps": len(q) / sec,
                         "recall_at_10_vs_exact": common.recall_at_10(top, ti),
                         "opponents_recall_at_10_vs_exact": common.recall_at_10(bottom, bi),
                         "index_bytes": index_bytes, "peak_rss_mb": peak_rss_mb()})
    return rows


def _factory(c: dict, d: int) -> str:
    from trackstar.config import IndexParams
    from trackstar.retrieval.index import factory_string

    return factory_string(IndexParams(**c), d)


WORKERS = {"exact": run_exact, **{n: (lambda a, n=n: {"rows": run_config(a, n)}) for n in INDEXES}}


def child(args, what: str) -> dict:
    """One measurement (the exact baseline or one index) in a fresh process, so that its peak RSS is its own."""
    return common.run_worker(__file__, what, vars(args))


def main() -> None:
    if common.worker_mode(WORKERS):
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=".", help="a repo after `dvc repro` (its encodings/final stores)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--sigma", type=float, default=0.5, help="relative norm of the per-copy perturbation")
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--train-sample", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed searches per setting (the median is reported)")
    ap.add_argument("--work", default="/tmp/trackstar-bench-retrieval")
    ap.add_argument("--indexes", default=",".join(INDEXES))
    ap.add_argument("--out", default=str(HERE / "results/retrieval.json"))
    ap.add_argument("--reuse-exact", action="store_true", help="keep the ground truth of an earlier run in --work")
    ap.add_argument("--update", action="store_true",
                    help="replace only the rows of --indexes in an existing --out (same data, same exact baseline)")
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    make_data(args)
    gen_s = time.perf_counter() - t
    raw_bytes = args.rows * args.d * 4
    exact_json = Path(args.work) / "exact.json"
    if args.reuse_exact and exact_json.exists():
        exact = json.loads(exact_json.read_text())
    else:
        exact = child(args, "exact")
        exact_json.write_text(json.dumps(exact))
    for qset in QUERY_SETS:
        print(f"exact streaming search, {qset}: {exact[qset]['qps']:.1f} queries/s "
              f"(mean top-1 score {exact[qset]['top1_score_mean']:.3f})", flush=True)
    rows = []
    for name in args.indexes.split(","):
        for r in child(args, name)["rows"]:
            r.update(rows=args.rows, d=args.d, exact_qps=exact[r["queries"]]["qps"],
                     speedup_vs_exact=r["qps"] / exact[r["queries"]]["qps"],
                     index_bytes_ratio=r["index_bytes"] / raw_bytes)
            rows.append(r)
            print(f"{r['queries']} {r['name']}: recall@10 {r['recall_at_10_vs_exact']:.3f}", flush=True)
    if args.update and Path(args.out).exists():
        done = set(args.indexes.split(","))
        old = [r for r in json.loads(Path(args.out).read_text())["configs"] if r["index"] not in done]
        rows = sorted(old + rows, key=lambda r: (list(INDEXES).index(r["index"]), r["queries"]))
    ok = [r for r in rows if r["recall_at_10_vs_exact"] >= 0.97 and r["speedup_vs_exact"] >= 10
          and r["index_bytes_ratio"] <= 0.05]
    result = {
        "data": {"rows": args.rows, "d": args.d, "queries": args.queries, "k": args.k, "sigma": args.sigma,
                 "source": f"{args.repo}/encodings/final (real TrackStar encodings), Gaussian-projected to d, "
                           "tiled with per-copy Gaussian perturbation, unit-normalized",
                 "raw_fp32_bytes": raw_bytes, "generate_s": gen_s,
                 "timing": f"median of {args.repeats} timed searches per setting (exact search included)"},
        "exact": exact,
        "configs": rows,
        "meets_goal": [f"{r['queries']}: {r['name']}" for r in ok],
    }
    common.show("retrieval", write_results(Path(args.out), vars(args), result))


if __name__ == "__main__":
    main()
