"""DVC stage `encode@{train,query}` and `encode_shard@<name>`: projected, corrected per-example gradients into
a chunked Zarr store.

Resumable: chunks finished before a crash are kept in .work/ and skipped. Under torchrun (one node or many) each
rank encodes on its own device (cuda:LOCAL_RANK, or the CPU) and writes its own whole chunks (rank 0 creates the
store, then a barrier). `encode.py shards` encodes every shard whose store is missing, ranks taking whole shards
(docs/shards.md). Prints the memory plan of the Hessian stages first and refuses to start when no structure fits
hessian.memory_gb: a check only (the hessian params are not this stage's DVC params, so editing them never
re-encodes).
"""

import json
import sys

from trackstar import layout
from trackstar.config import load_params
from trackstar.data.records import corpus_files, count_lines
from trackstar.encode.encoder import Encoder
from trackstar.encode.writer import StoreJob
from trackstar.hessian.plan import plan
from trackstar.runner import run_main

INPUTS = {"train": layout.CORPUS, "query": layout.QUERIES}


def main() -> None:
    split = sys.argv[1]
    params = load_params()
    enc = Encoder.from_params(params)  # on this rank's device (trackstar.distributed)
    rank, world = enc.ranks.rank, enc.ranks.world
    n_train = sum(count_lines(f) for f in corpus_files())  # the corpus and its shards
    p = plan(enc.attrs["layout"], n_train, count_lines(layout.QUERIES), params.hessian, params.encode)
    if rank == 0:
        print(p.text(), file=sys.stderr)
    p.require()
    if split in ("shard", "shards"):
        # shard NAME: one shard's store (one process). shards [NAME...]: of the listed shards (default: all, by
        # name), rank r of a torchrun job owns r, r + world, ... (one writer per store) and encodes those whose
        # store is missing
        names = sys.argv[2:] or sorted(params.data.shards)
        if split == "shards":
            names = [s for s in names[rank::world] if not (layout.raw_shard_store(s) / "zarr.json").exists()]
        for name in names:
            if name not in params.data.shards:
                raise SystemExit(f"error: params.yaml data.shards has no shard {name!r}")
            job = StoreJob(f"shard:{name}", layout.shard_data(name), layout.raw_shard_store(name),
                           layout.work_dir(f"encode-shard-{name}"))
            print(json.dumps(enc.encode_store(job)))
        return
    job = StoreJob(split, INPUTS[split], layout.raw_store(split), layout.work_dir(f"encode-{split}"))
    with enc.ranks.group():  # nccl on CUDA, gloo on the CPU; none with one process
        summary = enc.encode_store(job, enc.ranks)
    if rank == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    run_main(main)
