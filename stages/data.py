"""DVC stage `data`: the generated fact world, or the user's corpus/queries validated and copied: the corpus
to data/corpus.jsonl, each shard of `data.shards` to data/shards/<name>.jsonl (jsonl, parquet, arrow or a
`datasets` directory in; jsonl out), passage ids unique across all of them."""

import json
import os
import shutil
import tempfile
from pathlib import Path

from trackstar.config import load_params
from trackstar.corpus import read_passages
from trackstar.data import FactWorldConfig, generate_fact_world, query_record, read_queries, write_jsonl
from trackstar.errors import InputError
from trackstar.runner import run_main

OUT = Path("data")
SHARDS = OUT / "shards"


def copy_passages(src: str, dest: Path, p, seen: dict[str, str]) -> int:
    """Stream one corpus file into jsonl, refusing an id already seen in an earlier file; returns the count.
    A jsonl file with the default fields is validated, then copied byte for byte."""
    if Path(src).suffix == ".jsonl" and (p.text_column, p.id_column) == ("text", "id"):
        n = 0
        for x in read_passages(src):
            if x.id in seen:
                raise InputError(src, f"duplicate id {x.id!r} (also in {seen[x.id]})", line=n + 1, field="id")
            seen[x.id] = src
            n += 1
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return n

    def rows():
        for x in read_passages(src, p.text_column, p.id_column):
            if x.id in seen:
                raise InputError(src, f"duplicate id {x.id!r} (also in {seen[x.id]})", field=p.id_column)
            seen[x.id] = src
            yield {"id": x.id, "text": x.text}
    return write_jsonl(dest, rows())


def write_shards(p, seen: dict[str, str]) -> dict:
    """data/shards/: one jsonl per shard and shards.json (name -> source, passages), replaced as a whole."""
    tmp = Path(tempfile.mkdtemp(dir=OUT, prefix=".shards."))
    manifest = {name: {"source": src, "passages": copy_passages(src, tmp / f"{name}.jsonl", p, seen)}
                for name, src in sorted(p.shards.items())}
    (tmp / "shards.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(SHARDS, ignore_errors=True)
    os.replace(tmp, SHARDS)
    return manifest


def main() -> None:
    p = load_params().data
    OUT.mkdir(exist_ok=True)
    if p.source == "generate":
        cfg = FactWorldConfig(seed=p.seed, entities=p.entities, relations=p.relations, paraphrases=p.paraphrases,
                              question_fraction=p.question_fraction, distractors_per_entity=p.distractors_per_entity)
        passages, queries, stats = generate_fact_world(cfg)
        write_jsonl(OUT / "corpus.jsonl", ({"id": x.id, "text": x.text} for x in passages))
        write_jsonl(OUT / "queries.jsonl", (query_record(q) for q in queries))
        write_shards(p, {})
    else:
        seen: dict[str, str] = {}
        copy_passages(p.corpus, OUT / "corpus.jsonl", p, seen)  # validates every row (atomic write)
        shards = write_shards(p, seen)
        queries = read_queries(p.queries, corpus_ids=set(seen))
        stats = {"passages": len(seen), "shards": {k: v["passages"] for k, v in shards.items()},
                 "queries": len(queries)}
        fd, tmp = tempfile.mkstemp(dir=OUT, prefix=".queries.jsonl.")
        os.close(fd)
        shutil.copyfile(p.queries, tmp)
        os.replace(tmp, OUT / "queries.jsonl")
    print(json.dumps(stats))


if __name__ == "__main__":
    run_main(main)
