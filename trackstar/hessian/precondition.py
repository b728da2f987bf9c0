"""Preconditioning a raw store into its final store: G = W_mix g (W^T W = R_mix^(-1); basis from `eigen`,
update from `hessian`), unit-normalized, chunk by chunk, resumable (`trackstar.store.StoreWriter`)."""

from __future__ import annotations

from typing import Iterable

from trackstar import layout
from trackstar.hessian.whitening import load_whitening, whiten
from trackstar.store import ConcatReader, StoreSpec, StoreWriter

_KEPT = ("d", "k", "projection_seed", "correction", "checkpoint_hash", "layout", "config", "split", "input_sha256")


def precondition(split: str, shards: Iterable[str], root: layout.Root = ".") -> ConcatReader:
    """Whiten the raw store of `split` (train: the corpus, then its `shards`; query) into the final store of
    `split`, one final-store chunk in memory at a time (chunks across shard boundaries), skipping chunks a
    crashed run already wrote. Returns the raw reader (rows, d)."""
    w, meta = load_whitening(layout.at(layout.W_MIX, root), layout.at(layout.EIGEN, root))
    paths = layout.corpus_stores(shards, root) if split == "train" else [layout.raw_store("query", root)]
    raw = ConcatReader(paths,
                       expect={"d": meta["d"], "checkpoint_hash": meta["checkpoint_hash"], "config": meta["encode_config"]})
    attrs = {k: raw.attrs[k] for k in _KEPT}
    attrs.update(whitening_id=meta["whitening_id"], preconditioned=True, normalized=True)
    if len(raw.parts) > 1:  # the corpus, then its shards
        attrs["shards"] = {p.attrs["split"]: p.attrs["input_sha256"] for p in raw.parts[1:]}
    spec = StoreSpec(raw.n, raw.d, ["g"], raw.attrs["dtype"], raw.attrs["encode"]["chunk_mb"], raw.attrs["compressor"],
                     attrs)
    writer = StoreWriter(layout.final_store(split, root), layout.work_dir(f"precondition-{split}", root), spec)
    writer.prepare()
    todo = set(writer.pending())
    for start, x in raw.iter_blocks(writer.chunk_rows):
        c = start // writer.chunk_rows
        if c in todo:
            writer.write_chunk(c, {"g": whiten(x, w, normalize=True)})
    writer.finalize()
    return raw
