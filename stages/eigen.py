"""DVC stage `eigen`: R_train's eigenbasis (the one d_b^3 step per block of the Hessian) with R_eval mapped
into it, in the block structure `autocorrelation` recorded. It reads no params, so editing mix_k / lambda /
damping reruns only the cheap `hessian` stage."""

import json

import trackstar.hessian.stats as stats_lib
import trackstar.hessian.whitening as whitening_lib
from trackstar import layout
from trackstar.errors import ArtifactMismatch
from trackstar.hessian.stats import load_stats
from trackstar.hessian.whitening import eigenbasis, save_basis
from trackstar.memo import code_hash, memo_key
from trackstar.runner import run_main
from trackstar.store import StoreReader


def main() -> None:
    stats = load_stats(layout.STATS)
    meta = stats.meta
    query = StoreReader(layout.raw_store("query"))
    for key in ("d", "checkpoint_hash"):
        if meta[key] != query.attrs[key]:
            raise ArtifactMismatch(f"{layout.STATS}: '{key}' differs from {query.path}; run `dvc repro`")
    d = meta["d"]
    basis = eigenbasis(stats.r_train, stats.blocks, meta["n_eval"],
                       query_chunks=lambda: (x for _, x in query.iter_chunks()), r_eval=stats.r_eval)
    for b, v in zip(basis, meta.get("norm4_train", [])):
        b.norm4 = v
    out = {"structure": meta["structure"], "chunk_rows": meta["chunk_rows"], "d": d, "n_train": meta["n_train"], "n_eval": meta["n_eval"],
           "checkpoint_hash": meta["checkpoint_hash"], "encode_config": meta["encode_config"]}
    # names the basis by everything that determines it; the whitening files and final stores carry ids built on it
    out["basis_id"] = memo_key(out=out, stats=meta, query=query.attrs, code=code_hash(stats_lib, whitening_lib))
    save_basis(layout.EIGEN, basis, out)
    print(json.dumps({"d": d, "structure": meta["structure"], "blocks": len(basis),
                      "eval_rank": sum(b.g.shape[1] for b in basis)}))


if __name__ == "__main__":
    run_main(main)
