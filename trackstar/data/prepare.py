"""The `data` stage's work: the generated fact world, or the user's corpus / queries validated and copied: the
corpus to data/corpus.jsonl, each shard of `data.shards` to data/shards/<name>.jsonl (jsonl, parquet, arrow or a
`datasets` directory in; jsonl out), passage ids unique across all of them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from trackstar import layout
from trackstar.atomic import atomic_write_text, replace_dir
from trackstar.config import DataParams
from trackstar.data.corpus import read_passages
from trackstar.data.records import IdSet, query_record, read_queries, write_jsonl
from trackstar.data.world import generate_fact_world, world_config
from trackstar.errors import InputError


class CorpusIds:
    """The ids of the corpus files read so far (hashed, `IdSet`), to refuse one already in an earlier file."""

    def __init__(self) -> None:
        self.ids = IdSet()
        self.files: list[str] = []

    def add(self, src: str, pid: str, line: int, field: str, p: DataParams) -> None:
        """Record pid of src's row `line`; InputError when an earlier file holds it (a hash hit is confirmed by
        re-reading the earlier files)."""
        if not self.ids.add(pid):
            earlier = next((f for f in self.files if any(x.id == pid for x in read_passages(f, *columns(f, p)))), None)
            if earlier is not None:
                raise InputError(src, f"duplicate id {pid!r} (also in {earlier})", line=line, field=field)


def columns(src: str, p: DataParams) -> tuple[str, str]:
    """(text column, id column) of a corpus file: data.text_column / data.id_column, or text / id for the
    pipeline's own jsonl (the default fields), as `copy_passages` reads it."""
    return ("text", "id") if _plain(src, p) else (p.text_column, p.id_column)


def _plain(src: str, p: DataParams) -> bool:
    return Path(src).suffix == ".jsonl" and (p.text_column, p.id_column) == ("text", "id")


def copy_passages(src: str, dest: Path, p: DataParams, seen: CorpusIds) -> int:
    """Stream one corpus file into jsonl, refusing an id already seen in an earlier file; returns the count.
    A jsonl file with the default fields is validated, then copied byte for byte."""
    if _plain(src, p):
        n = 0
        for x in read_passages(src):
            n += 1
            seen.add(src, x.id, n, "id", p)
        shutil.copyfile(src, dest)
        seen.files.append(src)
        return n

    def rows():
        for n, x in enumerate(read_passages(src, p.text_column, p.id_column), start=1):
            seen.add(src, x.id, n, p.id_column, p)
            yield {"id": x.id, "text": x.text}
    count = write_jsonl(dest, rows())
    seen.files.append(src)
    return count


def write_shards(folder: Path, p: DataParams, seen: CorpusIds) -> dict:
    """folder/: one jsonl per shard of data.shards and shards.json (name -> source, passages)."""
    folder.mkdir()
    manifest = {name: {"source": src, "passages": copy_passages(src, folder / f"{name}.jsonl", p, seen)}
                for name, src in sorted(p.shards.items())}
    atomic_write_text(folder / layout.SHARDS_MANIFEST.name, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _stage(p: DataParams, tmp: Path) -> dict:
    """Every output into `tmp` (corpus.jsonl, queries.jsonl, shards/); returns the summary."""
    if p.source == "generate":
        passages, queries, stats = generate_fact_world(world_config(p))
        write_jsonl(tmp / layout.CORPUS.name, ({"id": x.id, "text": x.text} for x in passages))
        write_jsonl(tmp / layout.QUERIES.name, (query_record(q) for q in queries))
        write_shards(tmp / layout.SHARD_DATA.name, p, CorpusIds())
        return stats
    seen = CorpusIds()
    copy_passages(p.corpus, tmp / layout.CORPUS.name, p, seen)
    shards = write_shards(tmp / layout.SHARD_DATA.name, p, seen)
    queries = read_queries(p.queries, corpus_ids=seen.ids)
    stats = {"passages": len(seen.ids), "queries": len(queries)}
    if shards:
        stats["shards"] = {k: v["passages"] for k, v in shards.items()}
    shutil.copyfile(p.queries, tmp / layout.QUERIES.name)
    return stats


def prepare_data(p: DataParams, root: str | Path = ".") -> dict:
    """data/corpus.jsonl, data/queries.jsonl and data/shards/ under `root`, each complete (in a staging folder)
    before any is moved into place; returns the summary (the world's stats, or the counts of the user's files)."""
    data = layout.at(layout.DATA, root)
    data.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data, prefix=".staging.") as staging:
        tmp = Path(staging)
        stats = _stage(p, tmp)
        for path in (layout.CORPUS, layout.QUERIES):
            os.replace(tmp / path.name, layout.at(path, root))
        replace_dir(tmp / layout.SHARD_DATA.name, layout.at(layout.SHARD_DATA, root))
    return stats
