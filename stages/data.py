"""DVC stage `data`: the generated fact world, or the user's corpus/queries validated and copied: the corpus
to data/corpus.jsonl, each shard of `data.shards` to data/shards/<name>.jsonl (jsonl, parquet, arrow or a
`datasets` directory in; jsonl out), passage ids unique across all of them."""

import json
import os
import shutil
import tempfile
from pathlib import Path

from trackstar.config import load_params
from trackstar.data.corpus import read_passages
from trackstar.data.records import query_record, read_queries, write_jsonl
from trackstar.data.world import FactWorldConfig, generate_fact_world
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


def write_shards(folder: Path, p, seen: dict[str, str]) -> dict:
    """folder/: one jsonl per shard of data.shards and shards.json (name -> source, passages)."""
    folder.mkdir()
    manifest = {name: {"source": src, "passages": copy_passages(src, folder / f"{name}.jsonl", p, seen)}
                for name, src in sorted(p.shards.items())}
    (folder / "shards.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def main() -> None:
    p = load_params().data
    OUT.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=OUT, prefix=".staging."))  # every output is complete before any is moved
    try:
        if p.source == "generate":
            cfg = FactWorldConfig(seed=p.seed, entities=p.entities, relations=p.relations, paraphrases=p.paraphrases,
                                  question_fraction=p.question_fraction,
                                  distractors_per_entity=p.distractors_per_entity,
                                  confusers_per_entity=p.confusers_per_entity,
                                  confuser_true_value=p.confuser_true_value,
                                  near_miss_fraction=p.near_miss_fraction, contradicted=p.contradicted)
            passages, queries, stats = generate_fact_world(cfg)
            write_jsonl(tmp / "corpus.jsonl", ({"id": x.id, "text": x.text} for x in passages))
            write_jsonl(tmp / "queries.jsonl", (query_record(q) for q in queries))
            write_shards(tmp / "shards", p, {})
        else:
            seen: dict[str, str] = {}
            copy_passages(p.corpus, tmp / "corpus.jsonl", p, seen)
            shards = write_shards(tmp / "shards", p, seen)
            queries = read_queries(p.queries, corpus_ids=set(seen))
            stats = {"passages": len(seen), "queries": len(queries)}
            if shards:
                stats["shards"] = {k: v["passages"] for k, v in shards.items()}
            shutil.copyfile(p.queries, tmp / "queries.jsonl")
        for name in ("corpus.jsonl", "queries.jsonl"):
            os.replace(tmp / name, OUT / name)
        shutil.rmtree(SHARDS, ignore_errors=True)
        os.replace(tmp / "shards", SHARDS)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(stats))


if __name__ == "__main__":
    run_main(main)
