"""A wider Llama checkpoint (the pipeline's tokenizer, a few AdamW steps on the corpus so it has optimizer state)
for encode_throughput.py at other sizes than the default's: at hidden 128 a k = 24 projection per side costs
about as many FLOPs as the layer itself, so a wider model shows how the ratios move as the projection becomes a
small share of the work (the hidden-512 figures of benchmarks/README.md).

    python benchmarks/make_model.py --hidden 512 --out /tmp/model-h512   (repo root, after dvc repro)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.harness
from common import small_checkpoint  # noqa: E402
from trackstar.data.records import iter_corpus  # noqa: E402
from trackstar.model.checkpoint import load_checkpoint  # noqa: E402
from trackstar.model.train import ModelConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    texts = [p.text for _, p in zip(range(32 * args.steps), iter_corpus("data/corpus.jsonl"))]
    small_checkpoint(tok, cfg, texts, Path(args.out), args.steps)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
