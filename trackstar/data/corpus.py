"""A user's corpus file, streamed: jsonl (the simple default, validated line by line) or, through Hugging
Face `datasets`, a parquet / arrow file or a `save_to_disk` directory, read in batches of rows so a corpus
larger than RAM never sits in memory. The passage text and id come from configurable columns."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

from trackstar.data.records import IdSet, Passage, check_str, iter_corpus
from trackstar.errors import InputError

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def read_passages(path: str | Path, text_column: str = "text", id_column: str = "id",
                  batch_rows: int = 4096) -> Iterator[Passage]:
    """Passages of one corpus file or `save_to_disk` directory, in order; ids must be unique, text and id
    non-empty (integer ids are taken as their decimal string). Errors name the file, row and column."""
    p = Path(path)
    if not p.exists():
        raise InputError(str(path), "file does not exist")
    if not p.is_dir() and p.suffix in (".jsonl", ".json"):
        yield from iter_corpus(p, text_field=text_column, id_field=id_column)
        return
    seen = IdSet()
    n = 0
    for pid, text in _rows(p, text_column, id_column, batch_rows):
        n += 1
        pid = _value(p, n, pid, id_column, allow_int=True)
        text = _value(p, n, text, text_column)
        if not seen.add(pid):
            earlier = itertools.islice(_rows(p, text_column, id_column, batch_rows), n - 1)
            first = next((m for m, (other, _) in enumerate(earlier, start=1)
                          if _value(p, m, other, id_column, allow_int=True) == pid), None)
            if first is not None:
                raise InputError(str(p), f"duplicate id {pid!r} (first on row {first})", line=n, field=id_column)
        yield Passage(pid, text)
    if n == 0:
        raise InputError(str(p), "holds no rows")


def _rows(p: Path, text_column: str, id_column: str, batch_rows: int) -> Iterator[tuple[object, object]]:
    """(id, text) of every row, in order, from `_batches`."""
    for batch in _batches(p, text_column, id_column, batch_rows):
        yield from zip(batch[id_column], batch[text_column])


def _value(path: Path, n: int, v, column: str, allow_int: bool = False) -> str:
    """A row's text or id as a non-empty string (row numbers are 1-based, as lines are in jsonl)."""
    if allow_int and isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    return check_str(path, n, v, column)


def _batches(p: Path, text_column: str, id_column: str, batch_rows: int) -> Iterator[dict]:
    """Column batches ({column: list}) from `datasets`: a save_to_disk directory is memory-mapped Arrow,
    a parquet / arrow file is streamed (no Arrow cache is written)."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if p.is_dir():
        if not (p / "dataset_info.json").exists() and not (p / "dataset_dict.json").exists():
            raise InputError(str(p), "is a directory but not a `datasets` save_to_disk directory "
                             "(no dataset_info.json); give a .jsonl, .parquet or .arrow file or such a directory")
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            raise InputError(str(p), f"holds several splits ({', '.join(ds)}); save one split (ds['train'].save_to_disk)")
        columns = ds.column_names
    else:
        fmt = FORMATS.get(p.suffix)
        if fmt is None:
            raise InputError(str(p), f"unknown corpus format {p.suffix!r}: use .jsonl, .parquet, .arrow or a "
                             "`datasets` save_to_disk directory")
        try:
            ds = datasets.load_dataset(fmt, data_files=str(p), split="train", streaming=True)
            columns = ds.column_names or list(ds.features or {})
        except Exception as e:  # not a parquet / arrow file at all
            raise InputError(str(p), f"cannot be read as {fmt}: {type(e).__name__}: {str(e)[:200]}") from None
    for col in (text_column, id_column):
        if col not in columns:
            which = "data.text_column" if col == text_column else "data.id_column"
            raise InputError(str(p), f"no such column (columns: {', '.join(map(str, columns))}); set {which}",
                             field=col)
    ds = ds.select_columns([id_column, text_column]) if id_column != text_column else ds.select_columns([id_column])
    try:
        yield from ds.iter(batch_size=batch_rows)
    except InputError:
        raise
    except Exception as e:  # a corrupt file discovered mid-stream
        raise InputError(str(p), f"cannot be read: {type(e).__name__}: {str(e)[:200]}") from None
