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
from trackstar.data.records import query_record, read_queries, write_jsonl
from trackstar.data.world import generate_fact_world, world_config
from trackstar.errors import InputError


def copy_passages(src: str, dest: Path, p: DataParams, seen: dict[str, str]) -> int:
    """Stream one corpus file into jsonl, refusing an id already seen in an earlier file; returns the count.
    A jsonl file with the default fields is validated, then copied byte for byte."""
    if Path(src).suffix == ".jsonl" and (p.text_column, p.id_column) == ("text", "id"):
        n = 0
        for x in read_passages(src):
            n += 1
            if x.id in seen:
                raise InputError(src, f"duplicate id {x.id!r} (also in {seen[x.id]})", line=n, field="id")
            seen[x.id] = src
        shutil.copyfile(src, dest)
        return n

    def rows():
        for n, x in enumerate(read_passages(src, p.text_column, p.id_column), start=1):
            if x.id in seen:
                raise InputError(src, f"duplicate id {x.id!r} (also in {seen[x.id]})", line=n, field=p.id_column)
            seen[x.id] = src
            yield {"id": x.id, "text": x.text}
    return write_jsonl(dest, rows())


def write_shards(folder: Path, p: DataParams, seen: dict[str, str]) -> dict:
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
        write_shards(tmp / layout.SHARD_DATA.name, p, {})
        return stats
    seen: dict[str, str] = {}
    copy_passages(p.corpus, tmp / layout.CORPUS.name, p, seen)
    shards = write_shards(tmp / layout.SHARD_DATA.name, p, seen)
    queries = read_queries(p.queries, corpus_ids=set(seen))
    stats = {"passages": len(seen), "queries": len(queries)}
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
