"""Encode examples into a chunked store of projected, corrected per-example gradients.

Rows are processed chunk by chunk (one chunk of examples in memory), sorted by length inside a
chunk to limit padding, and written back in input order. Each rank owns whole chunks.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from trackstar.encode.correction import Correction
from trackstar.data.examples import Example, collate
from trackstar.testhooks import crash_point
from trackstar.encode.gradients import HookProjector, reference_encode
from trackstar.encode.layers import Layer
from trackstar.store import StoreWriter


def encode_chunk(model: torch.nn.Module, examples: list[Example], projector: HookProjector | None,
                 layers: list[Layer], k: int, seed: int, correction: Correction, batch_size: int, pad_id: int,
                 autocast_dtype: torch.dtype | None = None, out: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(corrected, plain) float32 rows for a list of examples, in their given order; written into the
    leading rows of `out` when given (buffers reused chunk after chunk: no fresh pages to fault in)."""
    if projector is None:  # exact element-wise correction: reference path
        c, p = reference_encode(model, layers, examples, pad_id, k, seed, correction)
        return c.numpy(), p.numpy()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    d = k * k * len(layers)
    if out is None:
        out = (np.empty((len(examples), d), dtype=np.float32), np.empty((len(examples), d), dtype=np.float32))
    cor, plain = out[0][:len(examples)], out[1][:len(examples)]
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        c, p = projector.encode_batch(collate([examples[j] for j in idx], pad_id), autocast_dtype)
        cor[idx] = c.detach().cpu().numpy()
        plain[idx] = (p if p is not None else c).detach().cpu().numpy()
    return cor, plain


def encode_to_store(model: torch.nn.Module, examples: Callable[[], Iterable[Example]], writer: StoreWriter,
                    layers: list[Layer], k: int, seed: int, correction: Correction, batch_size: int, pad_id: int,
                    rank: int = 0, world: int = 1, autocast_dtype: torch.dtype | None = None,
                    progress: bool = True, desc: str = "encode") -> int:
    """Encode the chunks this rank owes (skipping finished ones); returns the number of chunks written."""
    pending = set(writer.pending(rank, world))
    projector = None if correction.exact else HookProjector(
        model, layers, k, seed, correction, plain="g_plain" in writer.arrays,
        device=next(model.parameters()).device)
    rows_todo = sum(writer.chunk_range(c)[1] - writer.chunk_range(c)[0] for c in pending)
    bar = tqdm(total=rows_todo, desc=desc, unit="ex", disable=not progress or None, mininterval=2.0, dynamic_ncols=True)
    written, c, buf = 0, 0, []
    rows = max((writer.chunk_range(ci)[1] - writer.chunk_range(ci)[0] for ci in pending), default=0)
    out = tuple(np.empty((rows, k * k * len(layers)), dtype=np.float32) for _ in range(2))  # reused by every chunk

    def flush(chunk_examples: list[Example], c: int) -> None:
        nonlocal written
        if projector is not None:
            with projector.attached():
                cor, plain = encode_chunk(model, chunk_examples, projector, layers, k, seed, correction,
                                          batch_size, pad_id, autocast_dtype, out)
        else:
            cor, plain = encode_chunk(model, chunk_examples, None, layers, k, seed, correction, batch_size, pad_id)
        crash_point(f"before_write:{c}")
        arrays = {"g": cor, "g_plain": plain}
        writer.write_chunk(c, {name: arrays[name] for name in writer.arrays})
        crash_point(f"after_write:{c}")
        written += 1
        bar.update(len(chunk_examples))

    for ex in examples():
        start, stop = writer.chunk_range(c)
        if c in pending:
            buf.append(ex)
        else:
            buf.append(None)  # keep the count; this chunk is done or another rank's
        if len(buf) == stop - start:
            if c in pending:
                flush(buf, c)
            buf, c = [], c + 1
    if buf or c != writer.n_chunks:
        raise ValueError(f"input ended after {c} chunks + {len(buf)} rows; expected {writer.n} rows")
    bar.close()
    return written
