"""How far the fast rank-1 (Adafactor-style) optimizer correction is from the exact element-wise
Adam correction, on the pipeline's trained model: cosine of encodings and top-10 overlap.

Run after `dvc repro` (needs model/ and data/). Writes benchmarks/results/correction_gap.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from trackstar.model.checkpoint import load_checkpoint, load_second_moments
from trackstar.config import load_params
from trackstar.encode.correction import build_correction
from trackstar.data.records import iter_corpus, read_queries
from trackstar.encode.writer import encode_chunk
from trackstar.data.examples import passage_example, query_example
from trackstar.encode.gradients import HookProjector, reference_encode
from trackstar.encode.layers import find_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=600)
    ap.add_argument("--queries", type=int, default=100)
    args = ap.parse_args()
    p = load_params()
    torch.manual_seed(0)
    model, tok = load_checkpoint("model")
    pad = tok.pad_token_id
    layers = find_layers(model, p.gradients.include, p.gradients.exclude, p.gradients.include_lm_head)
    moments, _ = load_second_moments("model")
    k, seed, L = p.projection.k, p.projection.seed, p.gradients.max_length
    passages = [x for _, x in zip(range(args.passages), iter_corpus("data/corpus.jsonl"))]
    queries = read_queries("data/queries.jsonl")[: args.queries]
    pex = [passage_example(tok, x.text, L) for x in passages]
    qex = [query_example(tok, q.prompt, q.target, L) for q in queries]
    exact = build_correction("adam", layers, moments, p.correction.eps)
    rank1 = build_correction("adam_rank1", layers, moments, p.correction.eps)

    t0 = time.time()
    ex_p, _ = reference_encode(model, layers, pex, pad, k, seed, exact)
    ex_q, _ = reference_encode(model, layers, qex, pad, k, seed, exact)
    t_exact = time.time() - t0
    proj = HookProjector(model, layers, k, seed, rank1, plain=False)
    t0 = time.time()
    with proj.attached():
        r1_p, _ = encode_chunk(model, pex, proj, layers, k, seed, rank1, 32, pad)
        r1_q, _ = encode_chunk(model, qex, proj, layers, k, seed, rank1, 32, pad)
    t_rank1 = time.time() - t0

    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    ex_p, ex_q, r1_p, r1_q = map(unit, (ex_p.numpy(), ex_q.numpy(), r1_p, r1_q))
    cos_p = (ex_p * r1_p).sum(1)
    cos_q = (ex_q * r1_q).sum(1)
    top_ex = np.argsort(-(ex_q @ ex_p.T), axis=1)[:, :10]
    top_r1 = np.argsort(-(r1_q @ r1_p.T), axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_ex, top_r1)])
    out = {"passages": len(pex), "queries": len(qex), "d": int(ex_p.shape[1]),
           "cosine_passages_mean": float(cos_p.mean()), "cosine_passages_min": float(cos_p.min()),
           "cosine_queries_mean": float(cos_q.mean()), "cosine_queries_min": float(cos_q.min()),
           "top10_overlap_mean": float(overlap), "top10_changed_share": float(1 - overlap),
           "seconds_exact_reference": round(t_exact, 2), "seconds_rank1_hooks": round(t_rank1, 2),
           "speedup_rank1_vs_exact": round(t_exact / t_rank1, 2)}
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    write_results(Path("benchmarks/results/correction_gap.json"), {"params.yaml": yaml.safe_load(Path("params.yaml").read_text()), **vars(args)}, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
