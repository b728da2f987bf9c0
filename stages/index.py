"""DVC stage `index`: a FAISS inner-product index over the final train encodings."""

import json
import time

from trackstar import layout
from trackstar.config import load_params, param_error
from trackstar.retrieval.index import build_index, factory_string, save_index
from trackstar.runner import run_main
from trackstar.store import StoreReader


def main() -> None:
    p = load_params().index
    if p.on_disk and not p.kind.startswith("ivf"):
        raise param_error("index.on_disk", f"true needs index.kind ivf_flat or ivf_pq ({p.kind} has no inverted lists)")
    t0 = time.time()
    store = StoreReader(layout.final_store("train"))
    index = build_index(store, p.kind, p.nlist, p.pq_m, p.pq_bits, p.opq, p.train_sample, p.seed,
                        on_disk=layout.INDEX if p.on_disk else None, pca=p.pca)
    meta = {"kind": p.kind, "on_disk": p.on_disk, "pca": p.pca,
            "factory": factory_string(p.kind, p.pca or store.d, p.nlist, p.pq_m, p.pq_bits, p.opq, p.on_disk),
            "rows": store.n, "d": store.d, "checkpoint_hash": store.attrs["checkpoint_hash"],
            "whitening_id": store.attrs["whitening_id"], "config": store.attrs["config"]}
    save_index(index, layout.INDEX, meta)
    print(json.dumps({"rows": store.n, "d": store.d, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    run_main(main)
