"""DVC stage `evaluate`: attribution (MRR, recall@10), tail-patch influence and the Fig. 3 breakdown of the top
proponents per method; model accuracy and per-query predictions."""

import json
import sys
import time
from pathlib import Path

import numpy as np

from trackstar.evaluation.breakdown import CATEGORIES, TOP, method_breakdown, metric_names, query_breakdown
from trackstar.model.checkpoint import load_checkpoint
from trackstar.config import load_params
from trackstar.data.records import corpus_files, iter_corpus, read_queries, write_jsonl
from trackstar.data.rows import PassageText
from trackstar.evaluation.metrics import METHODS, dev_test_split, metrics_table, plot_methods, random_rows, split_metrics
from trackstar.data.examples import pad_token_id, passage_example, query_example
from trackstar.evaluation.predict import predict
from trackstar.retrieval.results import read_results
from trackstar.runner import run_main
from trackstar.evaluation.influence import AUTO_QUERIES, plan_tail_patch, run_tail_patch


def main() -> None:
    params = load_params()
    e = params.eval
    t0 = time.time()
    queries = read_queries("data/queries.jsonl")
    relevant = {q.id: set(q.relevant_ids or []) for q in queries}
    rankings = {"trackstar": read_results("retrievals/trackstar.jsonl"), "bm25": read_results("retrievals/bm25.jsonl")}
    for path in sorted(Path("retrievals/ladder").glob("*.jsonl")):
        rankings[path.stem] = read_results(path)
    ranked = {m: {r.example_id: r.proponent_ids for r in res} for m, res in rankings.items()}
    corpus = PassageText(corpus_files())  # one byte offset per passage, not its id
    k = max(len(v) for v in ranked["trackstar"].values())
    rows = random_rows(len(corpus), len(queries), k, e.seed)
    found = corpus.get(np.concatenate(rows).tolist()) if rows else {}
    ranked["random"] = {q.id: [found[int(j)].id for j in idx] for q, idx in zip(queries, rows)}
    metrics = metrics_table(ranked, relevant)

    sample = queries[: AUTO_QUERIES if e.tail_patch_queries == "auto" else e.tail_patch_queries]
    need = {pid for m in ranked for q in queries for pid in ranked[m][q.id][:TOP]}
    need |= {pid for m in ranked for q in sample for pid in ranked[m][q.id][: max(e.tail_patch_ks)]}
    text = {p.id: p.text for p in iter_corpus(corpus_files()) if p.id in need}
    names = metric_names(TOP)
    for m in ranked:
        shares = method_breakdown(query_breakdown([text[pid] for pid in ranked[m][q.id][:TOP]], ranked[m][q.id],
                                                  q.target, q.entity, q.relevant_ids) for q in queries)
        metrics[m].update({names[c]: shares[c] for c in CATEGORIES})

    model, tok = load_checkpoint("model")
    pad = pad_token_id(tok)
    max_len = params.gradients.max_length
    preds = predict(model, tok, queries, max_len)
    acc = sum(p["correct"] for p in preds) / len(preds)
    side = dev_test_split(queries, e.dev_fraction)
    write_jsonl("eval/predictions.jsonl", ({**p, "split": side[p["id"]]} for p in preds))
    extra = {}
    if sample:
        props = {m: [[passage_example(tok, text[pid], max_len) for pid in ranked[m][q.id][: max(e.tail_patch_ks)]]
                     for q in sample] for m in ranked}
        qex = [query_example(tok, q.prompt, q.target, max_len) for q in sample]
        plan = plan_tail_patch(model, qex, props, pad, e)
        print(plan.text(), file=sys.stderr, flush=True)
        tp, record = run_tail_patch(model, plan)
        if not record["trustworthy"]:
            print("WARNING: tail-patch figures are not trustworthy (metrics/model.json tail_patch.trustworthy: false): "
                  + "; ".join(record["reasons"]), file=sys.stderr)
        for m in metrics:
            metrics[m].update(tp[m])
            metrics[m]["tail_patch_queries"] = record["queries"]
        extra = {"tail_patch_v": record["v"], "tail_patch": record}
    ordered = {m: metrics[m] for m in METHODS if m in metrics}
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/metrics.json").write_text(json.dumps(ordered, indent=2))
    correct = {p["id"]: p["correct"] for p in preds}
    split = split_metrics({m: ranked[m] for m in ordered}, relevant, side, correct)
    Path("metrics/split.json").write_text(json.dumps({"dev_fraction": e.dev_fraction, **split}, indent=2))
    Path("metrics/model.json").write_text(json.dumps({"accuracy": acc, "queries": len(queries), **extra,
                                                      "eval_seconds": round(time.time() - t0, 1)}, indent=2))
    with open("metrics/methods.csv", "w") as f:
        cols = [c for c in next(iter(ordered.values())) if not c.startswith("n_")]
        f.write("method," + ",".join(cols) + "\n")
        for m, row in ordered.items():
            f.write(m + "," + ",".join(f"{row.get(c, float('nan')):.6g}" for c in cols) + "\n")
    plot_methods({m: {c: v for c, v in row.items() if c not in names.values() and not c.startswith("tail_patch_se")}
                  for m, row in ordered.items()},
                 "metrics/methods.png", title=f"TrackStar ladder (model accuracy {acc:.0%})")
    print(json.dumps({"accuracy": acc, **{m: round(v["mrr"], 3) for m, v in ordered.items()}}))


if __name__ == "__main__":
    run_main(main)
