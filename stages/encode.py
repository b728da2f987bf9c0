"""DVC stage `encode@{train,query}`: projected, corrected per-example gradients into a chunked Zarr store.

Resumable: chunks finished before a crash are kept in .work/ and skipped. Under torchrun each
rank writes its own whole chunks (rank 0 creates the store, then a barrier). Prints the memory plan of the
Hessian stages first and refuses to start when no structure fits hessian.memory_gb: a check only (the hessian
params are not this stage's DVC params, so editing them never re-encodes).
"""

import json
import os
import sys

import torch.distributed as dist

from trackstar.config import load_params
from trackstar.data import count_lines
from trackstar.encode import encode_to_store
from trackstar.encoder import Encoder
from trackstar.fingerprint import file_sha256
from trackstar.moments import MOMENTS_FILE
from trackstar.plan import plan
from trackstar.runner import run_main
from trackstar.store import StoreWriter

INPUTS = {"train": "data/corpus.jsonl", "query": "data/queries.jsonl"}


def main() -> None:
    split = sys.argv[1]
    params = load_params()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("nccl" if params.encode.device == "cuda" else "gloo")
    src = INPUTS[split]
    enc = Encoder("model", params.gradients, params.correction, params.projection, params.encode,
                  moments=MOMENTS_FILE)
    n = count_lines(src)
    p = plan(enc.attrs["layout"], count_lines(INPUTS["train"]), count_lines(INPUTS["query"]), params.hessian,
             params.encode)
    if rank == 0:
        print(p.text(), file=sys.stderr)
    p.require()
    arrays = ["g", "g_plain"] if params.encode.save_plain else ["g"]
    writer = StoreWriter(f"encodings/raw/{split}.zarr", f".work/encode-{split}", n, enc.d, arrays,
                         params.encode.dtype, params.encode.chunk_mb, params.encode.compressor,
                         attrs={**enc.attrs, "split": split, "input_sha256": file_sha256(src),
                                "encode": params.encode.model_dump(exclude={"device", "batch_size"})})
    if rank == 0:
        resumed = writer.prepare()
        if resumed:
            print(f"resuming: {len(writer.done_chunks())}/{writer.n_chunks} chunks already written", file=sys.stderr)
    if world > 1:
        dist.barrier()
    examples = enc.passages if split == "train" else enc.queries
    written = encode_to_store(enc.model, lambda: examples(src), writer, enc.layers, enc.p.k, enc.p.seed,
                              enc.correction, params.encode.batch_size, enc.pad_id, rank, world, enc.autocast,
                              desc=f"encode@{split}")
    if world > 1:
        dist.barrier()
    if rank == 0:
        writer.finalize({"truncated": enc.truncated})
        print(json.dumps({"rows": n, "d": enc.d, "chunks": writer.n_chunks, "written": written,
                          "truncated": enc.truncated}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
