"""DVC stage `data`: the generated fact world, or the user's corpus/queries validated and copied."""

import json
import os
import shutil
import tempfile
from pathlib import Path

from trackstar.config import load_params
from trackstar.data import FactWorldConfig, generate_fact_world, iter_corpus, query_record, read_queries, write_jsonl
from trackstar.runner import run_main

OUT = Path("data")


def main() -> None:
    p = load_params().data
    OUT.mkdir(exist_ok=True)
    if p.source == "generate":
        cfg = FactWorldConfig(seed=p.seed, entities=p.entities, relations=p.relations, paraphrases=p.paraphrases,
                              question_fraction=p.question_fraction, distractors_per_entity=p.distractors_per_entity,
                              confusers_per_entity=p.confusers_per_entity, confuser_true_value=p.confuser_true_value,
                              near_miss_fraction=p.near_miss_fraction)
        passages, queries, stats = generate_fact_world(cfg)
        write_jsonl(OUT / "corpus.jsonl", ({"id": x.id, "text": x.text} for x in passages))
        write_jsonl(OUT / "queries.jsonl", (query_record(q) for q in queries))
    else:
        ids = {x.id for x in iter_corpus(p.corpus)}  # validates every line before anything is written
        queries = read_queries(p.queries, corpus_ids=ids)
        stats = {"passages": len(ids), "queries": len(queries)}
        for src, name in ((p.corpus, "corpus.jsonl"), (p.queries, "queries.jsonl")):
            fd, tmp = tempfile.mkstemp(dir=OUT, prefix=f".{name}.")
            os.close(fd)
            shutil.copyfile(src, tmp)
            os.replace(tmp, OUT / name)
    print(json.dumps(stats))


if __name__ == "__main__":
    run_main(main)
