"""DVC stage `precondition@{train,query}`: G = W_mix g (W^T W = R_mix^(-1); basis from `eigen`, update from
`hessian`), unit-normalized, into the final store."""

import json
import sys

from trackstar import layout
from trackstar.config import load_params
from trackstar.hessian.whitening import load_whitening, whiten
from trackstar.runner import run_main
from trackstar.store import ConcatReader, StoreSpec, StoreWriter


def main() -> None:
    split = sys.argv[1]
    w, meta = load_whitening(layout.W_MIX, layout.EIGEN)
    paths = layout.corpus_stores(load_params().data.shards) if split == "train" else [layout.raw_store("query")]
    raw = ConcatReader(paths,
                       expect={"d": meta["d"], "checkpoint_hash": meta["checkpoint_hash"], "config": meta["encode_config"]})
    attrs = {k: raw.attrs[k] for k in ("d", "k", "projection_seed", "correction", "checkpoint_hash", "layout",
                                       "config", "split", "input_sha256")}
    attrs.update(whitening_id=meta["whitening_id"], preconditioned=True, normalized=True)
    if len(raw.parts) > 1:  # the corpus, then its shards
        attrs["shards"] = {p.attrs["split"]: p.attrs["input_sha256"] for p in raw.parts[1:]}
    spec = StoreSpec(raw.n, raw.d, ["g"], raw.attrs["dtype"], raw.attrs["encode"]["chunk_mb"], raw.attrs["compressor"],
                     attrs)
    writer = StoreWriter(layout.final_store(split), layout.work_dir(f"precondition-{split}"), spec)
    writer.prepare()
    todo = set(writer.pending())
    rows = {}
    for start, x in raw.iter_blocks(writer.chunk_rows):  # the final store's chunks, across shard boundaries
        c = start // writer.chunk_rows
        if c in todo:
            rows = {"g": whiten(x, w, normalize=True)}
            writer.write_chunk(c, rows)
    writer.finalize()
    print(json.dumps({"rows": raw.n, "d": raw.d}))


if __name__ == "__main__":
    run_main(main)
