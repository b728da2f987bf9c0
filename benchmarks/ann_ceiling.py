"""The recall ceiling of compressed ANN for TrackStar queries, and why 5 % of raw bytes is below it.

TrackStar whitens passages with R^(-1/2), so their corrected encodings have a flat spectrum, and a
query's scores against N of them behave like draws from one Gaussian. A compressed scan followed by
an exact rerank of its best R candidates then finds the true top-10 with a probability set only by
N, R and the quantizer's score noise D = 1 - corr(estimated score, exact score)^2. Shannon's
rate-distortion bound for a Gaussian source caps any quantizer, averaged over query directions, at
D >= 2^(-2b) with b bits a dimension (5 % of fp32 is b = 1.6).

Three parts, written to benchmarks/results/ann_ceiling.json:
  spectrum    the pipeline's final stores (`--repo`, after `dvc repro`): share of passage energy in
              the top principal directions against a flat spectrum, and share of query energy
              inside the passages' span (the rest cannot affect any score)
  quantizers  FAISS codes on isotropic unit rows (`--n-check` x `--d`): measured D (every row
              scored for a sample of queries) and recall@10 after rerank R, beside the model's
              prediction at the measured D, which checks the model
  routing     IVF-Flat on the same rows: recall@10 against the share of rows its probed lists hold
  ceiling     the model at `--rows` rows for Shannon's D at 1, 1.6 and 2 bits a dimension
The model: backward Gaussian test channel, s = s_hat + e with s_hat ~ N(0, 1 - D), e ~ N(0, D);
recall@10 = share of the top 10 of s inside the top R of s_hat (Monte Carlo, `--trials`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import write_results  # noqa: E402
from common import recall_at_10, show  # noqa: E402

HERE = Path(__file__).resolve().parent
RERANKS = (10, 100, 300, 500, 1000, 3000)
# FAISS factory -> bits a dimension at d = 1024 (RaBitQ adds a few floats a row)
QUANTIZERS = {"PQ256x4fs": 1.0, "RaBitQ": 1.0, "PQ512x4fs": 2.0}


def model_recall(n: int, distortion: float, reranks=RERANKS, trials: int = 40, seed: int = 0) -> dict[int, float]:
    """Monte Carlo recall@10 after an exact rerank of the top R estimated scores (see module doc)."""
    rng = np.random.default_rng(seed)
    hits = {r: 0.0 for r in reranks}
    for _ in range(trials):
        est = rng.standard_normal(n, dtype=np.float32) * np.float32(np.sqrt(1 - distortion))
        true = est + rng.standard_normal(n, dtype=np.float32) * np.float32(np.sqrt(distortion))
        top = np.argpartition(-true, 10)[:10]
        rank = np.empty(n, dtype=np.int64)
        rank[np.argsort(-est)] = np.arange(n)
        for r in reranks:
            hits[r] += float(np.mean(rank[top] < r))
    return {r: hits[r] / trials for r in reranks}


def spectrum(repo: Path) -> dict:
    """Flatness of the whitened passage spectrum and the query energy inside the passage span."""
    from trackstar.retrieval.index import principal_directions
    from trackstar.store import StoreReader

    x = StoreReader(repo / "encodings/final/train.zarr").read_all()
    q = StoreReader(repo / "encodings/final/query.zarr").read_all().astype(np.float64)
    if len(x) > 20_000:
        x = x[np.random.default_rng(0).choice(len(x), 20_000, replace=False)]
    ev, basis = principal_directions(x)  # d x rank
    rank = basis.shape[1]
    shares = {f"{p}%": float(ev[: max(1, rank * p // 100)].sum() / ev.sum()) for p in (1, 10, 50)}
    inside = np.sum((q @ basis) ** 2, axis=1) / np.sum(q ** 2, axis=1)
    return {"rows": len(x), "d": x.shape[1], "rank": rank,
            "passage_energy_in_top_pct_of_directions": shares,
            "query_energy_in_passage_span_mean": float(inside.mean())}


def isotropic(n: int, d: int, queries: int, seed: int):
    """(rows, queries, exact scores, exact top-10 rows): unit Gaussian rows and queries."""
    rng = np.random.default_rng(seed)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    x = unit(rng.standard_normal((n, d), dtype=np.float32))
    q = unit(rng.standard_normal((queries, d), dtype=np.float32))
    exact = q @ x.T
    return x, q, exact, np.argpartition(-exact, 10, axis=1)[:, :10]


def check_routing(data, nlist: int = 256) -> list[dict]:
    """Recall@10 of IVF-Flat (exact scores inside the probed lists) on the same isotropic rows, against
    the share of rows its probed lists hold: with no clusters to route by, the two stay close."""
    import faiss

    x, q, _, top = data
    n, d = x.shape
    index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x[: min(n, 65_536)])
    index.add(x)
    sizes = np.array([index.invlists.list_size(i) for i in range(nlist)])
    out = []
    for nprobe in (nlist // 64, nlist // 16, nlist // 4):
        index.nprobe = nprobe
        _, ids = index.search(q, 10)
        _, probed = index.quantizer.search(q, nprobe)
        out.append({"nlist": nlist, "nprobe": nprobe, "rows_scanned_share": float(sizes[probed].sum(1).mean() / n),
                    "recall_at_10": recall_at_10(top, ids)})
    return out


def check_quantizers(data, seed: int, trials: int) -> list[dict]:
    """Measured D and recall of FAISS codes on isotropic unit rows, beside the model at that D."""
    import faiss

    x, q, exact, top = data
    n, d = x.shape
    out = []
    for factory, bits in QUANTIZERS.items():
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(x[: min(n, 65_536)])
        index.add(x)
        est, ids = index.search(q, max(RERANKS))
        recall = {r: recall_at_10(top, ids, r) for r in RERANKS}
        sample = q[:16]  # every row scored: the noise of all rows, not only of the candidates
        all_est, all_ids = index.search(sample, n)
        # 1 - corr^2 of estimated and exact scores: the backward channel's D, and comparable for codes whose
        # error is not of that form (RaBitQ's estimate is unbiased: exact + independent noise)
        rho = np.corrcoef(all_est.ravel(), np.take_along_axis(exact[:16], all_ids, axis=1).ravel())[0, 1]
        distortion = float(1 - rho ** 2)
        out.append({"factory": factory, "bits_per_dim": bits, "bytes_per_row": int(index.sa_code_size()),
                    "measured_D": distortion, "recall_at_10": recall,
                    "model_recall_at_10": model_recall(n, min(distortion, 0.99), trials=trials, seed=seed)})
        print(f"{factory}: D {distortion:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=".", help="a repo after `dvc repro` (its encodings/final stores)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="corpus size of the ceiling")
    ap.add_argument("--n-check", type=int, default=200_000, help="rows of the quantizer check")
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results/ann_ceiling.json"))
    args = ap.parse_args()
    result = {"model": __doc__.strip().splitlines()[-2:], "reranks": list(RERANKS)}
    if (Path(args.repo) / "encodings/final/train.zarr").exists():
        result["spectrum"] = spectrum(Path(args.repo))
    data = isotropic(args.n_check, args.d, args.queries, args.seed)
    result["quantizers"] = {"rows": args.n_check, "d": args.d, "queries": args.queries,
                            "results": check_quantizers(data, args.seed, args.trials)}
    result["routing"] = check_routing(data)
    result["ceiling"] = {"rows": args.rows, "results": []}
    for bits in (1.0, 1.6, 2.0):
        distortion = 2.0 ** (-2 * bits)
        rec = model_recall(args.rows, distortion, trials=args.trials, seed=args.seed)
        result["ceiling"]["results"].append({"bits_per_dim": bits, "index_bytes_ratio": bits / 32,
                                             "shannon_D": distortion, "recall_at_10": rec})
    show("ann_ceiling", write_results(Path(args.out), vars(args), result))


if __name__ == "__main__":
    main()
