"""The store side of encoding: which store an input file goes to, and its examples grouped into the chunks
a rank still owes (each rank owns whole chunks; finished chunks are skipped on resume)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from trackstar.data.examples import Example
from trackstar.store import StoreWriter


@dataclass(frozen=True)
class StoreJob:
    """One input file into one store: the split its attrs record (train, query or shard:<name>), the input
    JSONL, the store and the folder that keeps finished chunks across a crash."""

    split: str
    src: Path
    out: Path
    work: Path


def pending_chunks(writer: StoreWriter, examples: Iterable[Example], rank: int, world: int
                   ) -> Iterator[tuple[int, list[Example]]]:
    """(chunk, its examples) for each chunk this rank still owes, in order. Every example is still drawn, so
    every input line is validated and the count is checked against the store's rows."""
    pending = set(writer.pending(rank, world))
    c, buf = 0, []
    for ex in examples:
        start, stop = writer.chunk_range(c)
        buf.append(ex if c in pending else None)  # None keeps the count: this chunk is done or another rank's
        if len(buf) == stop - start:
            if c in pending:
                yield c, buf
            buf, c = [], c + 1
    if buf or c != writer.n_chunks:
        raise ValueError(f"input ended after {c} chunks + {len(buf)} rows; expected {writer.n} rows")
