"""DVC stage `hessian`: lambda by eigen-crossing and the damped whitening factors W (W^T W = R^(-1))
of R_mix = lambda R_eval + (1 - lambda) R_train and of R_train alone (the ladder's r_train rung)."""

import json
import os
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

import trackstar.hessian as hessian_lib
from trackstar.config import load_params
from trackstar.errors import ArtifactMismatch
from trackstar.hessian import (damped_shift, eig_factor, eig_scales, eigh_scaled, eigvals_desc, eigvals_desc_rows, low_rank_update,
                               mix_lambda, whitening, whitening_blocks)
from trackstar.memo import Memo, code_hash, memo_key
from trackstar.plots import plot_eigen_crossing
from trackstar.runner import run_main
from trackstar.store import StoreReader

OUT = Path("hessian")
STATS = OUT / "stats.safetensors"


def save_factor(w: np.ndarray, name: str) -> None:
    tmp = OUT / f"{name}.tmp"
    save_file({"w": np.ascontiguousarray(w, dtype=np.float32)}, str(tmp))
    os.replace(tmp, OUT / f"{name}.safetensors")


def main() -> None:
    h = load_params().hessian
    t0 = time.time()
    stats = safe_open(str(STATS), "np")  # R_train / R_eval are read only where a solver needs them
    stats_meta = json.loads(stats.metadata()["meta"])
    query = StoreReader("encodings/raw/query.zarr")
    for key in ("d", "checkpoint_hash"):
        if stats_meta[key] != query.attrs[key]:
            raise ArtifactMismatch(f"{STATS}: '{key}' differs from encodings/raw/query.zarr; run `dvc repro`")
    d, n_eval = stats_meta["d"], stats_meta["n_eval"]
    tr_train, tr_eval = stats_meta["trace_train"], stats_meta["trace_eval"]
    # R_eval = (1/n) U^T U has rank <= n queries: with n < d/2, W_mix is a low-rank update of the
    # train-only factor (2 d^2 n flops) instead of a second d^3 eigensolve
    low_rank = not h.block_diagonal and 2 * n_eval <= d
    if h.block_diagonal:  # per-layer blocks: small eigensolves, not memoized
        blocks = [(l["start"], l["stop"]) for l in query.attrs["layout"]]
        w_train, e_train = whitening_blocks(stats.get_tensor("r_train"), blocks, h.damping)
        e_eval = whitening_blocks(stats.get_tensor("r_eval"), blocks, 0.0)[1]
    else:
        # the eigen-decomposition depends on the statistics and this code, not on mix_k / lambda / damping: memoized
        memo = Memo(".work/hessian", keep=2)
        key = memo_key(stats=stats_meta, query=query.attrs, code=code_hash(hessian_lib))
        eig = memo.load_arrays("eig", key)
        if eig is None:
            rows = query.read_all() if low_rank else None  # the query rows U, needed once per memo entry
            e, v, scale = eigh_scaled(stats.get_tensor("r_train"))
            e_eval = eigvals_desc_rows(rows) if low_rank else eigvals_desc(stats.get_tensor("r_eval"))
            eig = {"e": e, "vt": v.T, "scale": np.array([scale]), "e_eval": e_eval}
            if low_rank:
                eig["vtu"] = v.T @ rows.T  # V^T U^T: B = W0 U^T is then a row scaling for every lambda
            memo.save_arrays("eig", key, eig)
        e, vt, scale, e_eval = eig["e"], eig["vt"], float(eig["scale"][0]), eig["e_eval"]
        w_train = eig_factor(e, vt, scale, 1.0, damped_shift(tr_train, d, h.damping))
        e_train = (e * scale)[::-1].copy()
    lam = h.lambda_ if h.lambda_ is not None else mix_lambda(e_eval, e_train, h.mix_k)
    if low_rank:
        shift = damped_shift(lam * tr_eval + (1 - lam) * tr_train, d, h.damping)
        b = eig["vtu"] * (eig_scales(e, scale, 1 - lam, shift) * np.sqrt(lam / n_eval)).astype(np.float32)[:, None]
        w_mix = low_rank_update(eig_factor(e, vt, scale, 1 - lam, shift), b)
    else:
        r_mix = lam * stats.get_tensor("r_eval").astype(np.float64) + (1 - lam) * stats.get_tensor("r_train")
        w_mix = (whitening_blocks(r_mix, blocks, h.damping) if h.block_diagonal else whitening(r_mix, h.damping))[0]

    save_factor(w_mix, "w_mix")
    save_factor(w_train, "w_train")
    meta = {"lambda": lam, "lambda_source": "fixed" if h.lambda_ is not None else f"eigen-crossing at component {h.mix_k}",
            "mix_k": h.mix_k, "damping": h.damping, "block_diagonal": h.block_diagonal,
            "mix_solver": "block eigensolves" if h.block_diagonal else "low-rank update" if low_rank else "eigensolve",
            "n_train": stats_meta["n_train"], "n_eval": n_eval, "d": d, "checkpoint_hash": stats_meta["checkpoint_hash"],
            "encode_config": stats_meta["encode_config"]}
    # identifies W_mix by everything that determines it (hashing the d x d file itself costs more): the
    # final stores and the index carry it, and retrieval / trace refuse artifacts whose ids differ
    meta["whitening_id"] = memo_key(meta=meta, stats=stats_meta, query=query.attrs, code=code_hash(hessian_lib))
    (OUT / "hessian.json").write_text(json.dumps(meta, indent=2))
    with open(OUT / "eigenvalues.csv", "w") as f:
        f.write("component,train,eval,train_scaled,eval_scaled\n")
        for i in range(len(e_train)):
            f.write(f"{i + 1},{e_train[i]:.6g},{e_eval[i]:.6g},{(1 - lam) * e_train[i]:.6g},{lam * e_eval[i]:.6g}\n")
    plot_eigen_crossing(e_train, e_eval, lam, h.mix_k, OUT / "eigen_crossing.png")
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/hessian.json").write_text(json.dumps({"lambda": lam, "n_train": stats_meta["n_train"], "n_eval": n_eval,
                                                        "d": d, "seconds": round(time.time() - t0, 1)}, indent=2))
    print(json.dumps({"lambda": lam, "d": d, "mix_solver": meta["mix_solver"]}))


if __name__ == "__main__":
    run_main(main)
