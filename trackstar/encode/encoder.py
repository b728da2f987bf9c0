"""The configured gradient encoder: checkpoint + layer selection + correction + projection, built once from
the params.

One object used by the encode stage, `trackstar trace`, the server, tests and benchmarks, so a query is
encoded exactly the same way everywhere; it owns d <-> k, the second moments of the correction, the projector,
dtype, device and autocast, and encodes an example list, a query or a whole store. The attrs it records let
consumers refuse mismatched artifacts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from trackstar import layout
from trackstar.config import Params
from trackstar.data.examples import Example, collate, pad_token_id, passage_example, query_example
from trackstar.data.records import count_lines, iter_corpus, read_queries
from trackstar.distributed import Ranks
from trackstar.encode.correction import build_correction
from trackstar.encode.gradients import HookProjector, reference_encode
from trackstar.encode.layers import find_layers, layout as column_layout
from trackstar.encode.moments import second_moments
from trackstar.encode.projection import Projection
from trackstar.encode.writer import StoreJob, pending_chunks
from trackstar.errors import InputError
from trackstar.fingerprint import file_sha256
from trackstar.model.checkpoint import checkpoint_hash, load_for_gradients
from trackstar.store import StoreSpec, StoreWriter
from trackstar.testhooks import crash_point


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `encode.autocast` on `device` (auto: bf16 on CUDA, none on the CPU); None: off."""
    return torch.bfloat16 if setting == "bf16" or (setting == "auto" and device.type == "cuda") else None


class Encoder:
    """Projected, corrected per-example gradients of one checkpoint, as the params configure them."""

    def __init__(self, params: Params, model_dir: str | Path, moments_file: str | Path,
                 params_file: str | Path = "params.yaml"):
        g, c = params.gradients, params.correction
        self.ranks = Ranks.from_env(params.encode.device)  # this rank's device: cuda:LOCAL_RANK or the CPU
        self.model, self.tok, self.device = load_for_gradients(model_dir, self.ranks.device, g.max_length,
                                                               params_file)
        self.pad_id = pad_token_id(self.tok)
        self.layers = find_layers(self.model, g.include, g.exclude, g.include_lm_head)
        k = params.projection.k_for(len(self.layers))  # projection.d -> k
        self.params = params.model_copy(update={"projection": params.projection.model_copy(update={"k": k})})
        self.ckpt_hash = checkpoint_hash(model_dir)
        self.autocast = autocast_dtype(params.encode.autocast, self.device)
        moments = second_moments(model_dir, moments_file, self.ckpt_hash, c.kind)
        self.correction = build_correction(c.kind, self.layers, moments.tensors, c.eps, str(moments.origin))
        # set up once; the exact element-wise correction has no hook path (reference encoder)
        self.projection = Projection(self.layers, k, params.projection.seed)
        self.projector = None if self.correction.exact else HookProjector(
            self.model, self.projection, self.correction, plain=params.encode.save_plain)
        self.truncated = 0

    @classmethod
    def from_params(cls, params: Params, root: Path = Path(".")) -> "Encoder":
        """The encoder of the pipeline at `root`: its model/, its moments file and its params.yaml (for errors)."""
        root = Path(root)
        return cls(params, root / layout.MODEL, root / layout.MOMENTS, root / "params.yaml")

    @property
    def k(self) -> int:
        """The per-layer projection size (k x k per layer), from projection.k or projection.d."""
        return self.params.projection.k

    @property
    def d(self) -> int:
        """The encoding's width: k^2 x the number of encoded layers."""
        return self.projection.d

    @property
    def attrs(self) -> dict:
        """What a store made by this encoder records (and what readers check)."""
        p = self.params
        return {"d": self.d, "k": self.k, "projection_seed": p.projection.seed, "correction": p.correction.kind,
                "checkpoint_hash": self.ckpt_hash, "layout": column_layout(self.layers, self.k),
                "config": {"gradients": p.gradients.model_dump(), "correction": p.correction.model_dump(),
                           "projection": p.projection.model_dump()}}

    def _check(self, ex: Example, path, line: int, field: str = "text") -> Example:
        g = self.params.gradients
        if ex.truncated:
            if g.truncation == "refuse":
                raise InputError(str(path), f"longer than gradients.max_length={g.max_length} tokens "
                                 "(set gradients.truncation: truncate to cut it)", line=line, field=field)
            self.truncated += 1
        return ex

    def passages(self, path) -> Iterator[Example]:
        """The examples of a corpus file (JSONL passages), checked against gradients.truncation."""
        for i, p in enumerate(iter_corpus(path)):
            yield self._check(passage_example(self.tok, p.text, self.params.gradients.max_length), path, i + 1)

    def queries(self, path) -> Iterator[Example]:
        """The examples of a queries file; a target that tokenizes to nothing or does not fit is refused."""
        max_length = self.params.gradients.max_length
        for i, q in enumerate(read_queries(path)):
            try:
                ex = query_example(self.tok, q.prompt, q.target, max_length)
            except ValueError as e:  # a target is never truncated: it tokenizes to nothing or does not fit
                why = ("tokenizes to nothing" if "nothing" in str(e) else
                       f"does not fit in gradients.max_length={max_length} tokens (targets are never truncated)")
                raise InputError(str(path), why, line=i + 1, field="target") from None
            yield self._check(ex, path, i + 1, field="prompt")

    def query_example(self, prompt: str, target: str) -> Example:
        return query_example(self.tok, prompt, target, self.params.gradients.max_length)

    def encode(self, examples: list[Example], out: tuple[np.ndarray, np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(corrected, plain) float32 rows of a list of examples, in their given order (plain = corrected when
        encode.save_plain is off). Batched after sorting by length (little padding); written into the leading
        rows of `out` when given (buffers reused chunk after chunk: no fresh pages to fault in)."""
        if self.projector is None:  # exact element-wise correction: reference path
            c, p = reference_encode(self.model, self.projection, examples, self.pad_id, self.correction)
            return c.numpy(), p.numpy()
        if out is None:
            out = tuple(np.empty((len(examples), self.d), dtype=np.float32) for _ in range(2))
        cor, plain = out[0][:len(examples)], out[1][:len(examples)]
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        batch_size = self.params.encode.batch_size
        with self.projector.attached():
            for i in range(0, len(order), batch_size):
                idx = order[i:i + batch_size]
                c, p = self.projector.encode_batch(collate([examples[j] for j in idx], self.pad_id), self.autocast)
                cor[idx] = c.detach().cpu().numpy()
                plain[idx] = (p if p is not None else c).detach().cpu().numpy()
        return cor, plain

    def encode_query(self, prompt: str, target: str) -> np.ndarray:
        """The corrected row, shape (1, d) float32, of one query; an InputError naming `target` when the target
        tokenizes to nothing or does not fit gradients.max_length."""
        try:
            ex = self.query_example(prompt, target)
        except ValueError as e:
            raise InputError("query", str(e), field="target") from None
        return self.encode([ex])[0]

    def encode_store(self, job: StoreJob, ranks: Ranks = Ranks()) -> dict:
        """Encode one input file into its store, resumably: the chunks this rank owes, skipping finished ones.
        With world > 1 the ranks share its chunks (`ranks.group()` is up; rank 0 creates and finalizes the
        store). Returns rank 0's summary (rows, d, chunks, written, truncated)."""
        e = self.params.encode
        rank, world = ranks.rank, ranks.world
        n = count_lines(job.src)
        arrays = ["g", "g_plain"] if e.save_plain else ["g"]
        # how the rows were computed (device, batches, autocast) is not recorded: the attrs say what they are
        attrs = {**self.attrs, "split": job.split, "input_sha256": file_sha256(job.src),
                 "encode": e.model_dump(exclude={"device", "batch_size", "autocast"})}
        writer = StoreWriter(job.out, job.work, StoreSpec(n, self.d, arrays, e.dtype, e.chunk_mb, e.compressor, attrs))
        self.truncated = 0
        if rank == 0 and writer.prepare():
            print(f"resuming: {len(writer.done_chunks())}/{writer.n_chunks} chunks already written", file=sys.stderr)
        ranks.barrier()
        ranges = [writer.chunk_range(c) for c in writer.pending(rank, world)]
        bar = tqdm(total=sum(b - a for a, b in ranges), desc=f"encode@{job.split}", unit="ex", disable=None,
                   mininterval=2.0, dynamic_ncols=True)
        rows = max((b - a for a, b in ranges), default=0)
        out = tuple(np.empty((rows, self.d), dtype=np.float32) for _ in range(2))  # reused by every chunk
        examples = self.queries(job.src) if job.split == "query" else self.passages(job.src)
        written = 0
        for c, chunk in pending_chunks(writer, examples, rank, world):
            arrays = dict(zip(("g", "g_plain"), self.encode(chunk, out)))
            crash_point(f"before_write:{c}")
            writer.write_chunk(c, {name: arrays[name] for name in writer.arrays})
            crash_point(f"after_write:{c}")
            written += 1
            bar.update(len(chunk))
        bar.close()
        ranks.barrier()
        summary = {"split": job.split, "rows": n, "d": self.d, "chunks": writer.n_chunks, "written": written,
                   "truncated": self.truncated}
        if rank == 0:
            writer.finalize({"truncated": self.truncated})
        return summary
