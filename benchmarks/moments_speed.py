"""Estimated second moments (correction.kind: estimated): the `moments` stage's estimator (row/column means of v
from T x T Gram products) against the one-example-at-a-time autograd loop, same model, passages and run, and the
largest relative difference of the means. Writes results/moments_speed.json.

    python benchmarks/moments_speed.py --model /path/to/SmolLM2-checkpoint-dir --samples 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from trackstar.model.checkpoint import load_checkpoint
from trackstar.data.world import FactWorldConfig, generate_fact_world
from trackstar.data.examples import pad_token_id, passage_example
from trackstar.encode.gradients import estimate_second_moments, per_example_grads
from trackstar.encode.layers import find_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from tests.harness import write_results  # noqa: E402

OUT = Path(__file__).parent / "results" / "moments_speed.json"


def one_at_a_time(model, layers, examples, pad_id) -> dict[str, torch.Tensor]:
    """The previous estimator: full per-example gradients by autograd, one example at a time."""
    acc = {l.name: torch.zeros(l.n_out, l.n_in, dtype=torch.float64) for l in layers}
    for g in per_example_grads(model, layers, examples, pad_id):
        for l in layers:
            acc[l.name] += g[l.name].double() ** 2
    return {l.param_name: l.weight_grad_out_in((acc[l.name] / len(examples)).float()) for l in layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="model", help="checkpoint directory")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    model, tok = load_checkpoint(args.model)
    layers = find_layers(model, include_lm_head=True)
    passages, _, _ = generate_fact_world(FactWorldConfig(contradicted=0.0))
    examples = [passage_example(tok, p.text, args.max_length) for p in passages[: args.samples]]
    tokens = sum(len(e.input_ids) for e in examples)
    pad = pad_token_id(tok)

    t0 = time.perf_counter()
    new = estimate_second_moments(model, layers, examples, pad, batch_size=args.batch_size)
    t_new = time.perf_counter() - t0
    print(f"batched: {t_new:.1f} s for {len(examples)} passages ({tokens} tokens)", flush=True)
    t0 = time.perf_counter()
    old = one_at_a_time(model, layers, examples, pad)
    t_old = time.perf_counter() - t0
    layer_of = {l.param_name: l for l in layers}
    rel = 0.0
    for k, v in old.items():
        v = layer_of[k].weight_grad_out_in(v).double()  # (out, in), as the estimator's means
        for got, want in zip(new[k], (v.mean(1), v.mean(0))):
            rel = max(rel, float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)))

    res = {"model": args.model, "parameters": sum(p.numel() for p in model.parameters()), "layers": len(layers),
           "samples": len(examples), "tokens": tokens, "batch_size": args.batch_size,
           "one_at_a_time_s": round(t_old, 2), "batched_s": round(t_new, 2), "speedup": round(t_old / t_new, 2),
           "max_rel_diff": rel, "threads": torch.get_num_threads()}
    print(json.dumps(res, indent=2))
    write_results(OUT, vars(args), res)


if __name__ == "__main__":
    main()
