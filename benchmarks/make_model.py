"""A wider Llama checkpoint (the pipeline's tokenizer, a few AdamW steps on the corpus so it has
optimizer state) for throughput measurements at sizes other than the default's.

Why: at the default size (hidden 128) a k = 24 projection per side costs about as many FLOPs as
the layer itself, so encode/training ratios there measure the projection, not the method; a
wider model shows how the ratio moves as the projection becomes a small share of the work.

    python benchmarks/make_model.py --hidden 512 --out /tmp/model-h512   (repo root, after dvc repro)
"""

from __future__ import annotations

import argparse

import torch

from trackstar.model.checkpoint import load_checkpoint, save_checkpoint
from trackstar.data.records import iter_corpus
from trackstar.data.examples import collate, passage_example
from trackstar.model.train import ModelConfig, build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer-from", default="model")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    _, tok = load_checkpoint(args.tokenizer_from)
    cfg = ModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      intermediate_size=4 * args.hidden)
    model = build_model(cfg, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    texts = [p.text for _, p in zip(range(32 * args.steps), iter_corpus("data/corpus.jsonl"))]
    for s in range(args.steps):
        b = collate([passage_example(tok, t, 64) for t in texts[32 * s: 32 * (s + 1)]], tok.pad_token_id)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    save_checkpoint(model, tok, opt, args.out)
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
