"""Train the embedded fact-world model for given epochs; print time, tokens/s and accuracy.

The world's options are trackstar.data.world.FactWorldConfig's fields, its defaults (contradictions off).

    python benchmarks/train_world.py --epochs 20 40 [--entities 200] [--lr 3e-3] [--trace] ...
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

import torch

from trackstar.data.records import Query
from trackstar.data.world import FactWorldConfig, generate_fact_world
from trackstar.data.examples import passage_example
from trackstar.model.train import ModelConfig, TrainConfig, accuracy, build_model, pretrain, train_tokenizer


def statement_queries(passages, queries):
    """Statement-prefix probes: for each query's fact, the first relevant statement cut before the value."""
    by_id = {p.id: p.text for p in passages}
    out = []
    for q in queries:
        text = by_id[q.relevant_ids[0]]
        v = q.target.strip()
        i = text.rfind(" " + v)
        if i > 0:
            out.append(Query(q.id, text[:i], q.target, None))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, nargs="+", default=[10, 20, 30])
    world = [f for f in fields(FactWorldConfig) if f.name != "seed"]
    for f in world:
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default),
                        default=0.0 if f.name == "contradicted" else f.default)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--trace", action="store_true", help="print held-out accuracy after every epoch")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    passages, queries, stats = generate_fact_world(
        FactWorldConfig(seed=args.seed, **{f.name: getattr(args, f.name) for f in world}))
    texts = [p.text for p in passages]
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, args.vocab)
    t_tok = time.perf_counter() - t0
    n_tokens = sum(sum(passage_example(tok, t, 64).loss_mask) + 1 for t in texts)
    probes = statement_queries(passages, queries)
    print(json.dumps({"stats": stats, "tokens_per_epoch": n_tokens, "tokenizer_s": round(t_tok, 2),
                      "threads": torch.get_num_threads()}))
    for ep in args.epochs:
        mcfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, intermediate_size=4 * args.hidden,
                           seed=args.seed)
        model = build_model(mcfg, tok)
        tcfg = TrainConfig(epochs=ep, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                           warmup_fraction=args.warmup, seed=args.seed)
        trace = []

        def on_epoch(e: int) -> None:
            trace.append((e, round(accuracy(model, tok, queries, 64), 4), round(accuracy(model, tok, probes, 64), 4)))
            print(json.dumps({"run_epochs": ep, "epoch": e, "query_acc": trace[-1][1],
                              "statement_prefix_acc": trace[-1][2]}), flush=True)

        t0 = time.perf_counter()
        pretrain(model, tok, texts, tcfg, progress=False, on_epoch=on_epoch if args.trace else None)
        dt = time.perf_counter() - t0
        t1 = time.perf_counter()
        acc = accuracy(model, tok, queries, 64)
        acc_s = accuracy(model, tok, probes, 64)
        dt_eval = time.perf_counter() - t1
        print(json.dumps({
            "epochs": ep, "lr": args.lr, "batch_size": args.batch_size,
            "params": sum(p.numel() for p in model.parameters()),
            "train_s": round(dt, 1), "tokens_per_s": round(n_tokens * ep / dt),
            "query_acc": round(acc, 4), "statement_prefix_acc": round(acc_s, 4), "eval_s": round(dt_eval, 1),
        }), flush=True)


if __name__ == "__main__":
    main()
