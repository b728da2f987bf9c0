"""DVC stage `bm25`: the BM25 baseline (query text = prompt + target), same output format; the corpus is
streamed (twice), so memory does not grow with it."""

import json

from trackstar import layout
from trackstar.config import load_params
from trackstar.data.records import corpus_files, iter_corpus, read_queries
from trackstar.retrieval.bm25 import bm25_stream
from trackstar.retrieval.results import Hits, make_result, write_results
from trackstar.runner import run_main


def main() -> None:
    p = load_params().bm25
    queries = read_queries(layout.QUERIES)
    hits = bm25_stream(lambda: ((x.id, x.text) for x in iter_corpus(corpus_files())),
                       [(q.id, q.prompt + q.target) for q in queries], p.k, p.k1, p.b)
    need = {i for ids, _ in hits for i in ids}
    text = {x.id: x.text for x in iter_corpus(corpus_files()) if x.id in need}
    write_results(layout.BM25, (make_result(q, Hits(ids, scores), text, query_set="bm25")
                                for q, (ids, scores) in zip(queries, hits)))
    print(json.dumps({"queries": len(queries)}))


if __name__ == "__main__":
    run_main(main)
