"""DVC stage `hessian`: R_train, R_eval, lambda by eigen-crossing, damped R^(-1/2) (mix and train-only)."""

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.numpy import save_file

from trackstar.config import load_params
import trackstar.hessian as hessian_lib
from trackstar.hessian import (autocorrelation, eigh_scaled, eigvals_desc, inv_sqrt, inv_sqrt_blocks,
                               inv_sqrt_from_eig, mix_lambda)
from trackstar.memo import Memo, code_hash, memo_key
from trackstar.plots import plot_eigen_crossing
from trackstar.runner import run_main
from trackstar.store import StoreReader

OUT = Path("hessian")


def all_reduce_sum(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.numpy()


def main() -> None:
    h = load_params().hessian
    t0 = time.time()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    reduce = None
    if world > 1:  # under torchrun: each rank sums its own chunks, an all-reduce adds them up
        dist.init_process_group("gloo")
        reduce = all_reduce_sum
    train = StoreReader("encodings/raw/train.zarr")
    query = StoreReader("encodings/raw/query.zarr", expect={k: train.attrs[k] for k in ("d", "checkpoint_hash", "config")})
    # statistics and eigen-decompositions depend on the stores (their attrs pin config, checkpoint and
    # input), train_sample, the layout and this code, not on mix_k / lambda / damping: memoized
    memo = Memo(".work/hessian", keep=2)
    key = memo_key(train=train.attrs, query=query.attrs, train_sample=h.train_sample, code=code_hash(hessian_lib))
    stats = memo.load_arrays("stats", key)
    if stats is None:
        r_train, n_train = autocorrelation((x for _, x in train.iter_chunks(rank, world, h.train_sample)), train.d, reduce)
        r_eval, n_eval = autocorrelation((x for _, x in query.iter_chunks(rank, world)), query.d, reduce)
        if rank == 0:
            memo.save_arrays("stats", key, {"r_train": r_train, "r_eval": r_eval, "n": np.array([n_train, n_eval])})
    else:
        r_train, r_eval, (n_train, n_eval) = stats["r_train"], stats["r_eval"], stats["n"].tolist()
    if world > 1:
        dist.destroy_process_group()
        if rank != 0:
            return  # the eigensolves and outputs are rank 0's
    blocks = [(l["start"], l["stop"]) for l in train.attrs["layout"]]
    if h.block_diagonal:  # per-layer blocks: small eigensolves, not memoized
        w_train, e_train = inv_sqrt_blocks(r_train, blocks, h.damping)
        e_eval = inv_sqrt_blocks(r_eval, blocks, 0.0)[1]
    else:
        eig = memo.load_arrays("eig", key)
        if eig is None:
            e, v, scale = eigh_scaled(r_train)
            eig = {"e": e, "v": v, "scale": np.array([scale]), "e_eval": eigvals_desc(r_eval)}
            memo.save_arrays("eig", key, eig)
        w_train = inv_sqrt_from_eig(eig["e"], eig["v"], float(eig["scale"][0]), h.damping)
        e_train, e_eval = (eig["e"] * eig["scale"][0])[::-1].copy(), eig["e_eval"]
    lam = h.lambda_ if h.lambda_ is not None else mix_lambda(e_eval, e_train, h.mix_k)
    r_mix = lam * r_eval + (1 - lam) * r_train
    w_mix = inv_sqrt_blocks(r_mix, blocks, h.damping)[0] if h.block_diagonal else inv_sqrt(r_mix, h.damping)[0]

    OUT.mkdir(exist_ok=True)
    tmp = OUT / "hessian.safetensors.tmp"
    save_file({"r_train": r_train.astype(np.float32), "r_eval": r_eval.astype(np.float32),
               "w_mix": w_mix.astype(np.float32), "w_train": w_train.astype(np.float32)}, str(tmp))
    os.replace(tmp, OUT / "hessian.safetensors")
    meta = {"lambda": lam, "lambda_source": "fixed" if h.lambda_ is not None else f"eigen-crossing at component {h.mix_k}",
            "mix_k": h.mix_k, "damping": h.damping, "block_diagonal": h.block_diagonal, "n_train": n_train,
            "n_eval": n_eval, "d": train.d, "checkpoint_hash": train.attrs["checkpoint_hash"],
            "encode_config": train.attrs["config"]}
    (OUT / "hessian.json").write_text(json.dumps(meta, indent=2))
    with open(OUT / "eigenvalues.csv", "w") as f:
        f.write("component,train,eval,train_scaled,eval_scaled\n")
        for i in range(len(e_train)):
            f.write(f"{i + 1},{e_train[i]:.6g},{e_eval[i]:.6g},{(1 - lam) * e_train[i]:.6g},{lam * e_eval[i]:.6g}\n")
    plot_eigen_crossing(e_train, e_eval, lam, h.mix_k, OUT / "eigen_crossing.png")
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/hessian.json").write_text(json.dumps({"lambda": lam, "n_train": n_train, "n_eval": n_eval,
                                                        "d": train.d, "seconds": round(time.time() - t0, 1)}, indent=2))
    print(json.dumps({"lambda": lam, "d": train.d}))


if __name__ == "__main__":
    run_main(main)
