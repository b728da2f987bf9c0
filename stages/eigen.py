"""DVC stage `eigen`: R_train's eigenbasis (the one d^3 step of the Hessian) with R_eval mapped into it,
full or per layer block. It reads no mix_k / lambda / damping, so editing those reruns only the cheap
`hessian` stage."""

import json
from pathlib import Path

from safetensors import safe_open

import trackstar.hessian as hessian_lib
from trackstar.config import load_params
from trackstar.errors import ArtifactMismatch
from trackstar.hessian import eigenbasis, save_basis
from trackstar.memo import code_hash, memo_key
from trackstar.runner import run_main
from trackstar.store import StoreReader

STATS = Path("hessian/stats.safetensors")
OUT = Path("hessian/eigen.safetensors")


def main() -> None:
    h = load_params().hessian
    with safe_open(str(STATS), "np") as stats:
        meta = json.loads(stats.metadata()["meta"])
        query = StoreReader("encodings/raw/query.zarr")
        for key in ("d", "checkpoint_hash"):
            if meta[key] != query.attrs[key]:
                raise ArtifactMismatch(f"{STATS}: '{key}' differs from encodings/raw/query.zarr; run `dvc repro`")
        d = meta["d"]
        blocks = [(l["start"], l["stop"]) for l in query.attrs["layout"]] if h.block_diagonal else [(0, d)]
        basis = eigenbasis(stats.get_tensor("r_train"), blocks, meta["n_eval"],
                           query_chunks=lambda: (x for _, x in query.iter_chunks()),
                           r_eval=lambda: stats.get_tensor("r_eval"))
    norm4 = {(a, b): v for a, b, v in meta.get("norm4_train", [])}
    for b in basis:
        b.norm4 = norm4.get((b.start, b.stop), float("nan"))
    out = {"block_diagonal": h.block_diagonal, "d": d, "n_train": meta["n_train"], "n_eval": meta["n_eval"],
           "checkpoint_hash": meta["checkpoint_hash"], "encode_config": meta["encode_config"]}
    # names the basis by everything that determines it; the whitening files and final stores carry ids built on it
    out["basis_id"] = memo_key(out=out, stats=meta, query=query.attrs, code=code_hash(hessian_lib))
    save_basis(OUT, basis, out)
    print(json.dumps({"d": d, "blocks": len(blocks), "eval_rank": sum(b.g.shape[1] for b in basis)}))


if __name__ == "__main__":
    run_main(main)
