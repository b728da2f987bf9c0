"""Corpus / query jsonl records: reading with line-precise validation, and writing.

corpus.jsonl : {"id": str, "text": str}                    one passage a line
queries.jsonl: {"id": str, "prompt": str, "target": str,
                "relevant_ids": [str] (optional),
                "entity": str (optional)}                  one query a line
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Container, Iterable, Iterator

import numpy as np

from trackstar.atomic import atomic_open
from trackstar.errors import InputError


@dataclass
class Passage:
    id: str
    text: str


@dataclass
class Query:
    id: str
    prompt: str
    target: str
    relevant_ids: list[str] | None = None
    entity: str | None = None  # the fact's subject, when known (the viewer and the Fig. 3 breakdown use it)


# --------------------------------------------------------------------------- reading


def _iter_objects(path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, JSON object) for each line, streaming; validate line syntax."""
    p = Path(path)
    if not p.exists():
        raise InputError(str(path), "file does not exist")
    if p.is_dir():
        raise InputError(str(path), "is a directory, expected a .jsonl file")
    n = 0
    with open(p, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(str(path), f"invalid UTF-8 at byte {e.start} of the line", line=n) from None
            if n == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip():
                raise InputError(str(path), "blank line (every line must hold one JSON object)", line=n)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(str(path), f"malformed JSON: {e.msg} (column {e.colno})", line=n) from None
            if not isinstance(obj, dict):
                raise InputError(str(path), f"expected a JSON object, got {type(obj).__name__}", line=n)
            yield n, obj
    if n == 0:
        raise InputError(str(path), "file is empty")


def _req_str(path, n: int, obj: dict, name: str) -> str:
    if name not in obj:
        raise InputError(str(path), "missing", line=n, field=name)
    return check_str(path, n, obj[name], name)


def check_str(path, n: int, v, name: str) -> str:
    """A field's value as a non-empty, valid-unicode string, else an error naming file, line and field."""
    if not isinstance(v, str):
        raise InputError(str(path), f"must be a string, got {type(v).__name__}", line=n, field=name)
    if not v.strip():
        raise InputError(str(path), "must not be empty", line=n, field=name)
    _check_unicode(path, n, v, name)
    return v


def _check_unicode(path, n: int, v: str, name: str) -> None:
    """JSON escapes can smuggle unpaired surrogates (\\ud800) that no tokenizer or writer accepts."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(str(path), f"not valid Unicode: unpaired surrogate {v[e.start]!r} at character {e.start}",
                         line=n, field=name) from None


class IdSet:
    """The ids seen so far as 64-bit hashes, most of them in one sorted array: ~8 bytes an id where a set of
    strings takes ~100-200, so checking a 10M-passage corpus for repeats costs ~80 MB. A hit may be a hash
    collision (odds ~N^2 / 2^65): callers confirm it on the ids themselves before reporting a repeat."""

    def __init__(self, buffer: int = 1 << 17):
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()
        self._buffer = buffer

    @staticmethod
    def _hash(pid: str) -> int:
        return int.from_bytes(hashlib.blake2b(pid.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, pid: object) -> bool:
        if not isinstance(pid, str):
            return False
        h = self._hash(pid)
        return h in self._recent or self._in_sorted(h)

    def _in_sorted(self, h: int) -> bool:
        i = int(np.searchsorted(self._sorted, np.uint64(h)))
        return i < len(self._sorted) and int(self._sorted[i]) == h

    def add(self, pid: str) -> bool:
        """Record pid; False when its hash was already there (a repeat, or a collision to confirm)."""
        h = self._hash(pid)
        if h in self._recent or self._in_sorted(h):
            return False
        self._recent.add(h)
        if len(self._recent) >= self._buffer:
            self._sorted = np.sort(np.concatenate([self._sorted, np.fromiter(self._recent, np.uint64)]))
            self._recent = set()
        return True


def iter_corpus(path, text_field: str = "text", id_field: str = "id") -> Iterator[Passage]:
    """Stream passages from corpus.jsonl, validating each line (ids must be unique). `path` may be a list
    of files read one after the other as one corpus (the base corpus, then its shards): ids unique across all."""
    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    seen = IdSet()
    for j, one in enumerate(paths):
        for n, obj in _iter_objects(one):
            pid = _req_str(one, n, obj, id_field)
            text = _req_str(one, n, obj, text_field)
            if not seen.add(pid):
                first = _first_line(paths[:j + 1], id_field, pid, stop=(str(one), n))
                if first is not None:
                    where = f"line {first[1]}" if first[0] == str(one) else f"{first[0]}:{first[1]}"
                    raise InputError(str(one), f"duplicate id {pid!r} (first on {where})", line=n, field=id_field)
            yield Passage(pid, text)


def _first_line(paths: list, id_field: str, pid: str, stop: tuple[str, int]) -> tuple[str, int] | None:
    """(file, line) where pid first occurs before `stop` (file, line), or None (the hash hit was a collision)."""
    for one in paths:
        for n, obj in _iter_objects(one):
            if (str(one), n) == stop:
                return None
            if isinstance(obj, dict) and obj.get(id_field) == pid:
                return str(one), n
    return None


def corpus_files(data_dir: str | Path = "data") -> list[Path]:
    """The corpus as the pipeline stores it: data/corpus.jsonl, then data/shards/*.jsonl by name (docs/shards.md)."""
    data_dir = Path(data_dir)
    return [data_dir / "corpus.jsonl", *sorted((data_dir / "shards").glob("*.jsonl"))]


def read_queries(path, corpus_ids: Container[str] | None = None) -> list[Query]:
    """Read and validate queries.jsonl; relevant ids are checked against corpus_ids when given."""
    out: list[Query] = []
    seen: dict[str, int] = {}
    for n, obj in _iter_objects(path):
        qid = _req_str(path, n, obj, "id")
        prompt = _req_str(path, n, obj, "prompt")
        if "target" not in obj:
            raise InputError(str(path), "missing", line=n, field="target")
        target = obj["target"]
        if not isinstance(target, str):
            raise InputError(str(path), f"must be a string, got {type(target).__name__}", line=n, field="target")
        if not target.strip():
            raise InputError(str(path), "must not be empty", line=n, field="target")
        _check_unicode(path, n, target, "target")
        if qid in seen:
            raise InputError(str(path), f"duplicate id {qid!r} (first on line {seen[qid]})", line=n, field="id")
        seen[qid] = n
        rel = obj.get("relevant_ids")
        if rel is not None:
            if not isinstance(rel, list) or not all(isinstance(r, str) for r in rel):
                raise InputError(str(path), "must be a list of strings", line=n, field="relevant_ids")
            for r in rel:
                _check_unicode(path, n, r, "relevant_ids")
            if corpus_ids is not None:
                missing = [r for r in rel if r not in corpus_ids]
                if missing:
                    raise InputError(
                        str(path),
                        f"{len(missing)} id(s) not in the corpus, e.g. {missing[0]!r}",
                        line=n,
                        field="relevant_ids",
                    )
            rel = list(rel)
        entity = obj.get("entity")
        if entity is not None:
            entity = _req_str(path, n, obj, "entity")
        out.append(Query(qid, prompt, target, rel, entity))
    return out


def count_lines(path) -> int:
    """Number of lines (a last line without a newline counts), streaming in 1 MiB blocks."""
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            n += block.count(b"\n")
            last = block[-1:]
    return n + (0 if last == b"\n" else 1)


# --------------------------------------------------------------------------- writing


def write_jsonl(path, records: Iterable[Any]) -> int:
    """Write records (dicts or dataclasses) one JSON object a line, atomically. Returns the count."""
    n = 0
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            if not isinstance(r, dict):
                r = asdict(r)
            f.write(json.dumps(r, ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


def query_record(q: Query) -> dict:
    d = {"id": q.id, "prompt": q.prompt, "target": q.target}
    if q.relevant_ids is not None:
        d["relevant_ids"] = list(q.relevant_ids)
    if q.entity is not None:
        d["entity"] = q.entity
    return d
