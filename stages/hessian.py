"""DVC stage `hessian`: lambda by eigen-crossing and the damped mixed whitening W (W^T W = R_mix^(-1),
R_mix = lambda R_eval + (1 - lambda) R_train) as a low-rank update in R_train's eigenbasis (`eigen`):
it reads no d x d matrix, so a mix_k / lambda / damping edit costs well under a second here."""

import json
import sys
import time

import trackstar.hessian.stats as stats_lib
import trackstar.hessian.whitening as whitening_lib
from trackstar import layout
from trackstar.atomic import atomic_open
from trackstar.config import load_params
from trackstar.hessian.whitening import block_dampings, load_basis, mix_lambda, mixed_whitening, rank_report, save_whitening, spectra
from trackstar.memo import code_hash, memo_key
from trackstar.hessian.plan import estimate
from trackstar.evaluation.plots import plot_eigen_crossing
from trackstar.runner import run_main

OUT = layout.HESSIAN


def main() -> None:
    h = load_params().hessian
    t0 = time.time()
    blocks, basis = load_basis(layout.EIGEN, vectors=False)
    e_train, e_eval = spectra(blocks)
    lam = h.lambda_ if h.lambda_ is not None else mix_lambda(e_eval, e_train, h.mix_k)
    etas = block_dampings(blocks, h.damping, basis["n_train"])
    w = mixed_whitening(blocks, lam, etas)
    rank = rank_report(blocks, etas, basis["n_train"])
    rule = "Ledoit-Wolf shrinkage of R_train (hessian.damping=auto)" if h.damping == "auto" else "hessian.damping"
    eta_text = f"{etas[0]:.4g}" if len(set(etas)) == 1 else f"{min(etas):.4g}..{max(etas):.4g} over {len(etas)} blocks"
    if rank["rank_deficient"]:
        rank["warning"] = (f"R_train is rank-deficient: {rank['n_train']} training rows in d = {rank['d']} "
                           f"(rank <= {rank['rank_bound']}; {rank['d'] - rank['rank_bound']} directions carry no "
                           f"training signal). Damped by eta = {eta_text} x mean eigenvalue ({rule}): "
                           f"{rank['directions_below_shift']} eigen-directions lie below that shift and are not "
                           f"inflated by the whitening.")
        print(f"WARNING: {rank['warning']}", file=sys.stderr)
    meta = {"lambda": lam, "lambda_source": "fixed" if h.lambda_ is not None else f"eigen-crossing at component {h.mix_k}",
            "mix_k": h.mix_k, "damping": h.damping, "damping_rule": rule,
            "damping_eta": etas[0] if len(etas) == 1 else etas, "rank": rank,
            "structure": basis["structure"], "blocks": len(blocks),
            "eval_rank": sum(b.g.shape[1] for b in blocks), "n_train": basis["n_train"], "n_eval": basis["n_eval"],
            "d": basis["d"], "checkpoint_hash": basis["checkpoint_hash"], "encode_config": basis["encode_config"],
            "basis_id": basis["basis_id"]}
    # identifies W_mix by everything that determines it: the final stores and the index carry it, and
    # retrieval / trace refuse artifacts whose ids differ
    meta["whitening_id"] = memo_key(meta=meta, code=code_hash(stats_lib, whitening_lib))
    save_whitening(layout.W_MIX, w, meta)
    # the structure's block sizes and estimated peak bytes (not part of W: a memory-model edit leaves W as is)
    memory = estimate(basis["structure"], [(b.start, b.stop) for b in blocks], basis["n_eval"], *basis["chunk_rows"])
    with atomic_open(OUT / "hessian.json") as f:
        f.write(json.dumps({**meta, "memory": memory.record()}, indent=2))
    with atomic_open(OUT / "eigenvalues.csv") as f:
        f.write("component,train,eval,train_scaled,eval_scaled\n")
        for i in range(len(e_train)):
            f.write(f"{i + 1},{e_train[i]:.6g},{e_eval[i]:.6g},{(1 - lam) * e_train[i]:.6g},{lam * e_eval[i]:.6g}\n")
    plot_eigen_crossing(e_train, e_eval, lam, h.mix_k, OUT / "eigen_crossing.png")
    with atomic_open(layout.METRICS / "hessian.json") as f:
        f.write(json.dumps({"lambda": lam, "damping_eta": max(etas), "n_train": basis["n_train"], "n_eval": basis["n_eval"], "d": basis["d"],
                            "structure": basis["structure"], "blocks": len(blocks),
                            "largest_block": max(b.stop - b.start for b in blocks),
                            "estimated_peak_bytes": memory.peak, "seconds": round(time.time() - t0, 1)}, indent=2))
    print(json.dumps({"lambda": lam, "d": basis["d"], "eval_rank": meta["eval_rank"]}))


if __name__ == "__main__":
    run_main(main)
