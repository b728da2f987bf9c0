"""The mixed-Hessian whitening: the low-rank update in R_train's eigenbasis (what the `hessian` stage
does) against a dense float32 eigensolve of R_mix (the solver before it), both against a float64 reference.

Per solver: seconds (in this run, same machine), relative error of W^T W against (R_mix + shift I)^-1
in float64, max |score error| of the whitened, normalized query x passage scores, top-10 overlap with
the reference and the TrackStar MRR it gives. Run after `dvc repro` in a pipeline checkout (needs
hessian/, encodings/raw/, data/). Writes benchmarks/results/whitening.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import yaml

from trackstar.data.records import iter_corpus, read_queries
from trackstar.evaluation.metrics import mrr
from trackstar.hessian.whitening import (Whitening, damped_shift, eigenbasis, eigh_scaled, eig_scales,
                               mixed_whitening, whiten)
from trackstar.hessian.stats import load_stats
from trackstar.store import StoreReader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import write_results  # noqa: E402
from common import recall_at_10, show  # noqa: E402


def dense_whitening(r: np.ndarray, shift: float) -> Whitening:
    """The baseline: a float32 eigensolve of the damped R itself, W = diag(e + shift)^(-1/2) V^T."""
    e, v, scale, _ = eigh_scaled(r.astype(np.float32))
    d = len(r)
    empty = np.zeros((d, 0), np.float32)
    return Whitening([(0, d)], [v.T], [eig_scales(e, scale, 1.0, shift).astype(np.float32)],
                     [empty], [empty])


def scores(w: Whitening | np.ndarray, q: np.ndarray, p: np.ndarray) -> np.ndarray:
    if isinstance(w, np.ndarray):  # the float64 reference, a dense matrix
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
        return unit(q.astype(np.float64) @ w.T) @ unit(p.astype(np.float64) @ w.T).T
    return (torch.from_numpy(whiten(q, w, True)).double() @ torch.from_numpy(whiten(p, w, True)).double().T).numpy()


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    torch.manual_seed(0)
    meta = json.loads(Path("hessian/hessian.json").read_text())
    stats = load_stats("hessian/stats.safetensors")
    lam, damping, d = meta["lambda"], meta.get("damping_eta", meta["damping"]), meta["d"]
    if stats.blocks != [(0, d)]:
        raise SystemExit("this benchmark compares full-R whitenings: run the pipeline with hessian.structure: full")
    u = StoreReader("encodings/raw/query.zarr").read_all()
    # R_eval from the query rows (the stats hold it only for blocks no wider than the number of queries)
    r_train, r_eval = stats.r_train(0).astype(np.float64), u.T.astype(np.float64) @ u.astype(np.float64) / len(u)
    p = StoreReader("encodings/raw/train.zarr").read_all()
    r_mix = lam * r_eval + (1 - lam) * r_train
    shift = damped_shift(float(np.trace(r_mix)), d, damping)

    t0 = time.perf_counter()
    e, v = scipy.linalg.eigh(r_mix + shift * np.eye(d), driver="evd", check_finite=False)
    w_ref = (v * (1 / np.sqrt(np.clip(e, 1e-300, None)))).T
    t_ref = time.perf_counter() - t0
    inv_ref = w_ref.T @ w_ref

    t0 = time.perf_counter()
    w_dense = dense_whitening(r_mix, shift)
    t_dense = time.perf_counter() - t0
    t0 = time.perf_counter()  # once per set of statistics: the `eigen` stage
    basis = eigenbasis(stats.r_train, [(0, d)], len(u), lambda: [u], lambda i: r_eval.astype(np.float32))
    t_eig_train = time.perf_counter() - t0
    t0 = time.perf_counter()  # what the `hessian` stage computes after a mix_k / lambda / damping edit
    w_low = mixed_whitening(basis, lam, damping)
    t_low = time.perf_counter() - t0

    queries = read_queries("data/queries.jsonl")
    pids = np.array([x.id for x in iter_corpus("data/corpus.jsonl")])
    rel = [q.relevant_ids for q in queries]
    s_ref = scores(w_ref, u, p)
    top_ref = np.argsort(-s_ref, axis=1, kind="stable")[:, :10]
    out = {"d": d, "n_eval": len(u), "n_train": len(p), "lambda": lam, "damping": damping,
           "reference": {"solver": "float64 eigensolve", "seconds": round(t_ref, 2),
                         "mrr": mrr([pids[r[:100]] for r in np.argsort(-s_ref, axis=1, kind="stable")], rel)}}
    for name, w, sec in (("dense_f32_eigensolve", w_dense, t_dense), ("low_rank_update", w_low, t_low)):
        w64 = w.matrix()
        s = scores(w, u, p)
        order = np.argsort(-s, axis=1, kind="stable")
        out[name] = {"seconds": round(sec, 2),
                     "rel_error_inverse": float(np.linalg.norm(w64.T @ w64 - inv_ref) / np.linalg.norm(inv_ref)),
                     "max_abs_score_error": float(np.abs(s - s_ref).max()),
                     "top10_overlap_vs_reference": recall_at_10(top_ref, order),
                     "mrr": mrr([pids[r[:100]] for r in order], rel)}
    out["low_rank_update"]["seconds_eig_r_train_memoized"] = round(t_eig_train, 2)  # the `eigen` stage, not rerun
    out["speedup_low_rank_vs_dense"] = round(t_dense / t_low, 1)
    show("whitening", write_results(Path("benchmarks/results/whitening.json"),
                                    {"params.yaml": yaml.safe_load(Path("params.yaml").read_text())}, out))


if __name__ == "__main__":
    main()
