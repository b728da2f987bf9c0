"""Passage ids and texts by corpus row, read on demand from the corpus files through a byte-offset index.

The corpus is data/corpus.jsonl then its shards (`trackstar.data.records.corpus_files`), row i being the
i-th line across them, as in the encoding stores. Only one int64 offset per passage stays in memory; a
lookup seeks to each wanted line and parses it. A file changed since the index was built is refused
(its offsets no longer point at line starts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from trackstar.data.records import Passage
from trackstar.errors import ArtifactMismatch, InputError

_BLOCK = 1 << 20


def line_starts(path: Path) -> np.ndarray:
    """Byte offsets of every line's start (a last line without a newline counts; an empty file has none)."""
    starts = [np.zeros(1, dtype=np.int64)]
    pos, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == ord("\n"))
            starts.append(nl.astype(np.int64) + pos + 1)
            pos += len(block)
            last = block[-1:]
    out = np.concatenate(starts)
    return out[:-1] if last == b"\n" else out  # the offset after a final newline starts no line


class PassageText:
    """Row -> Passage over the corpus files, from byte offsets; the files' sizes and times are checked per read."""

    def __init__(self, files: Iterable[Path]):
        self.files = [Path(f) for f in files]
        self.starts = [line_starts(f) for f in self.files]
        self.first_row = np.cumsum([0] + [len(s) for s in self.starts])
        self._stamps = [self._stamp(f) for f in self.files]

    def __len__(self) -> int:
        return int(self.first_row[-1])

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns

    def get(self, rows: Iterable[int]) -> dict[int, Passage]:
        """The passages of the given rows (each file opened once, its lines read in offset order)."""
        want = sorted(set(int(r) for r in rows))
        if want and not 0 <= want[0] <= want[-1] < len(self):
            raise IndexError(f"rows {want[0]}..{want[-1]} outside the corpus's {len(self)} passages")
        out: dict[int, Passage] = {}
        part = np.searchsorted(self.first_row, want, side="right") - 1
        for i in sorted(set(part.tolist())):
            path = self.files[i]
            if self._stamp(path) != self._stamps[i]:
                raise ArtifactMismatch(f"{path}: changed since its passages were indexed; restart to read it again")
            with open(path, "rb") as f:
                for row in (r for r, p in zip(want, part) if p == i):
                    line_no = row - int(self.first_row[i])
                    f.seek(int(self.starts[i][line_no]))
                    out[row] = self._parse(path, line_no + 1, f.readline())
        return out

    @staticmethod
    def _parse(path: Path, line: int, raw: bytes) -> Passage:
        """One corpus line as a Passage (the checks `iter_corpus` made when the index was built still hold)."""
        text = raw.decode("utf-8").rstrip("\r\n")
        if line == 1:
            text = text.removeprefix("\ufeff")
        try:
            obj = json.loads(text)
            return Passage(str(obj["id"]), str(obj["text"]))
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(str(path), f"not a corpus record: {e}", line=line) from None
