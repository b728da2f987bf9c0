"""DVC stage `encode@{train,query}` and `encode_shard@<name>`: projected, corrected per-example gradients into
a chunked Zarr store.

Resumable: chunks finished before a crash are kept in .work/ and skipped. Under torchrun each
rank writes its own whole chunks (rank 0 creates the store, then a barrier). `encode.py shards` encodes
every shard whose store is missing, ranks taking whole shards (docs/shards.md). Prints the memory plan of the
Hessian stages first and refuses to start when no structure fits hessian.memory_gb: a check only (the hessian
params are not this stage's DVC params, so editing them never re-encodes).
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from trackstar.config import load_params
from trackstar.data.records import corpus_files, count_lines
from trackstar.encode.writer import encode_to_store
from trackstar.encode.encoder import Encoder
from trackstar.fingerprint import file_sha256
from trackstar.encode.moments import MOMENTS_FILE
from trackstar.hessian.plan import plan
from trackstar.runner import run_main
from trackstar.store import StoreWriter

INPUTS = {"train": "data/corpus.jsonl", "query": "data/queries.jsonl"}


def encode_one(enc: Encoder, params, split: str, src: str, out: str, work: str, rank: int, world: int) -> None:
    """One input file into one store; with world > 1 the ranks share its chunks (a process group is up)."""
    n = count_lines(src)
    arrays = ["g", "g_plain"] if params.encode.save_plain else ["g"]
    writer = StoreWriter(out, work, n, enc.d, arrays, params.encode.dtype, params.encode.chunk_mb,
                         params.encode.compressor,
                         attrs={**enc.attrs, "split": split, "input_sha256": file_sha256(src),
                                "encode": params.encode.model_dump(exclude={"device", "batch_size"})})
    if rank == 0:
        resumed = writer.prepare()
        if resumed:
            print(f"resuming: {len(writer.done_chunks())}/{writer.n_chunks} chunks already written", file=sys.stderr)
    if world > 1:
        dist.barrier()
    examples = enc.queries if split == "query" else enc.passages
    written = encode_to_store(enc.model, lambda: examples(src), writer, enc.layers, enc.p.k, enc.p.seed,
                              enc.correction, params.encode.batch_size, enc.pad_id, rank, world, enc.autocast,
                              desc=f"encode@{split}")
    if world > 1:
        dist.barrier()
    if rank == 0:
        writer.finalize({"truncated": enc.truncated})
        print(json.dumps({"split": split, "rows": n, "d": enc.d, "chunks": writer.n_chunks, "written": written,
                          "truncated": enc.truncated}))


def main() -> None:
    split = sys.argv[1]
    params = load_params()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    enc = Encoder("model", params.gradients, params.correction, params.projection, params.encode,
                  moments=MOMENTS_FILE)
    n_train = sum(count_lines(f) for f in corpus_files())  # the corpus and its shards
    p = plan(enc.attrs["layout"], n_train, count_lines(INPUTS["query"]), params.hessian, params.encode)
    if rank == 0:
        print(p.text(), file=sys.stderr)
    p.require()
    if split in ("shard", "shards"):
        # shard NAME: one shard's store (one process). shards [NAME...]: of the listed shards (default: all, by
        # name), rank r of a torchrun job owns r, r + world, ... (one writer per store) and encodes those whose
        # store is missing
        names = sys.argv[2:] or sorted(params.data.shards)
        if split == "shards":
            names = [s for s in names[rank::world] if not Path(f"encodings/raw/shards/{s}.zarr/zarr.json").exists()]
        for name in names:
            if name not in params.data.shards:
                raise SystemExit(f"error: params.yaml data.shards has no shard {name!r}")
            enc.truncated = 0
            encode_one(enc, params, f"shard:{name}", f"data/shards/{name}.jsonl", f"encodings/raw/shards/{name}.zarr",
                       f".work/encode-shard-{name}", 0, 1)
        return
    if world > 1:
        dist.init_process_group("nccl" if params.encode.device == "cuda" else "gloo")
    encode_one(enc, params, split, INPUTS[split], f"encodings/raw/{split}.zarr", f".work/encode-{split}", rank, world)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
