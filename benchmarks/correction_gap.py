"""How far the fast rank-1 (Adafactor-style) optimizer correction is from the exact element-wise
Adam correction, on the pipeline's trained model: cosine of encodings and top-10 overlap.

Run after `dvc repro` (needs model/ and data/). Writes benchmarks/results/correction_gap.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from trackstar.config import Params, load_params
from trackstar.data.records import iter_corpus, read_queries
from trackstar.data.examples import passage_example, query_example
from trackstar.encode.encoder import Encoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import write_results  # noqa: E402
from common import recall_at_10, show  # noqa: E402


def encoder(p: Params, kind: str) -> Encoder:
    """The pipeline's encoder with correction.kind `kind`: corrected rows only, 32 examples a batch."""
    return Encoder.from_params(p.model_copy(update={
        "correction": p.correction.model_copy(update={"kind": kind}),
        "encode": p.encode.model_copy(update={"save_plain": False, "batch_size": 32})}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passages", type=int, default=600)
    ap.add_argument("--queries", type=int, default=100)
    args = ap.parse_args()
    p = load_params()
    torch.manual_seed(0)
    exact, rank1 = encoder(p, "adam"), encoder(p, "adam_rank1")  # element-wise (reference path), rank-1 hooks
    tok, L = exact.tok, p.gradients.max_length
    passages = [x for _, x in zip(range(args.passages), iter_corpus("data/corpus.jsonl"))]
    queries = read_queries("data/queries.jsonl")[: args.queries]
    pex = [passage_example(tok, x.text, L) for x in passages]
    qex = [query_example(tok, q.prompt, q.target, L) for q in queries]

    t0 = time.time()
    ex_p, _ = exact.encode(pex)
    ex_q, _ = exact.encode(qex)
    t_exact = time.time() - t0
    t0 = time.time()
    r1_p, _ = rank1.encode(pex)
    r1_q, _ = rank1.encode(qex)
    t_rank1 = time.time() - t0

    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    ex_p, ex_q, r1_p, r1_q = map(unit, (ex_p, ex_q, r1_p, r1_q))
    cos_p = (ex_p * r1_p).sum(1)
    cos_q = (ex_q * r1_q).sum(1)
    top_ex = np.argsort(-(ex_q @ ex_p.T), axis=1)[:, :10]
    top_r1 = np.argsort(-(r1_q @ r1_p.T), axis=1)[:, :10]
    overlap = recall_at_10(top_ex, top_r1)
    out = {"passages": len(pex), "queries": len(qex), "d": int(ex_p.shape[1]),
           "cosine_passages_mean": float(cos_p.mean()), "cosine_passages_min": float(cos_p.min()),
           "cosine_queries_mean": float(cos_q.mean()), "cosine_queries_min": float(cos_q.min()),
           "top10_overlap_mean": float(overlap), "top10_changed_share": float(1 - overlap),
           "seconds_exact_reference": round(t_exact, 2), "seconds_rank1_hooks": round(t_rank1, 2),
           "speedup_rank1_vs_exact": round(t_exact / t_rank1, 2)}
    show("correction_gap", write_results(Path("benchmarks/results/correction_gap.json"), {
        "params.yaml": yaml.safe_load(Path("params.yaml").read_text()), **vars(args)}, out))


if __name__ == "__main__":
    main()
