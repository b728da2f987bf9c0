"""DVC stage `index`: what `retrieve` searches over the final train encodings. `flat` (exact): only
index/meta.json, naming the final store that is searched in place by streaming; the ANN kinds (or
`index.pca`): a FAISS inner-product index beside it."""

import json
import time

from trackstar.config import load_params, param_error
from trackstar.retrieval.searcher import write_index
from trackstar.runner import run_main


def main() -> None:
    p = load_params().index
    if p.on_disk and not p.kind.startswith("ivf"):
        raise param_error("index.on_disk", f"true needs index.kind ivf_flat or ivf_pq ({p.kind} has no inverted lists)")
    t0 = time.time()
    meta = write_index(p)
    print(json.dumps({"rows": meta["rows"], "d": meta["d"], "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    run_main(main)
