"""`trackstar trace PROMPT --target TEXT`: top proponents/opponents for any prompt, from the
pipeline's artifacts, encoded exactly as encode@query + precondition@query would.
`trackstar plan`: d, the Hessian structure and the memory each stage needs, before any long stage runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ArtifactMismatch
from .runner import flush_denormals, run_main


def _trace(args: argparse.Namespace) -> None:
    from .config import load_params
    from .data import iter_corpus

    root = Path(args.root)
    params = load_params(root / "params.yaml")
    if args.method == "bm25":
        from .bm25 import bm25_search
        (ids, scores), = bm25_search(((p.id, p.text) for p in iter_corpus(root / "data/corpus.jsonl")),
                                     [("q", args.prompt + args.target)], args.k, params.bm25.k1, params.bm25.b)
        top = list(zip(ids, scores))
        bottom: list[tuple[str, float]] = []
    else:
        from .encoder import Encoder
        from .hessian import load_whitening, whiten
        from .index import load_index, search
        from .results import valid_hits
        flush_denormals()  # torch is loaded now: encode exactly as the encode stage does
        from .store import StoreReader

        from .moments import MOMENTS_FILE

        enc = Encoder(root / "model", params.gradients, params.correction, params.projection, params.encode,
                      moments=root / MOMENTS_FILE, params_file=root / "params.yaml")
        final = StoreReader(root / "encodings/final/train.zarr")
        for key in ("checkpoint_hash", "d", "config"):
            if json.dumps(final.attrs[key], sort_keys=True) != json.dumps(enc.attrs[key], sort_keys=True):
                raise ArtifactMismatch(
                    f"{root / 'encodings/final/train.zarr'}: '{key}' differs from the current params.yaml/model "
                    f"(stored {str(final.attrs[key])[:80]!r}); run `dvc repro` first")
        w, wmeta = load_whitening(root / "hessian/w_mix.safetensors", root / "hessian/eigen.safetensors")
        if wmeta["whitening_id"] != final.attrs["whitening_id"]:
            raise ArtifactMismatch(f"{root / 'hessian/w_mix.safetensors'}: whitening {wmeta['whitening_id']} is not the one "
                                   f"{root / 'encodings/final/train.zarr'} was preconditioned with; run `dvc repro` first")
        index, _ = load_index(root / "index", expect={"whitening_id": final.attrs["whitening_id"],
                                                      "rows": final.n})
        g, _ = enc.encode([enc.query_example(args.prompt, args.target)])
        q = whiten(g, w, normalize=True)
        ts, ti, bs, bi = search(index, q, args.k, params.index.nprobe, params.index.rerank, final)
        (ts, ti), (bs, bi) = valid_hits(ts[0], ti[0]), valid_hits(bs[0], bi[0])
        ts, ti, bs, bi = ts[None], ti[None], bs[None], bi[None]
        rows = set(ti[0].tolist()) | set(bi[0].tolist())
        text = {i: p for i, p in enumerate(iter_corpus(root / "data/corpus.jsonl")) if i in rows}
        top = [(text[r].id, float(s)) for r, s in zip(ti[0], ts[0])]
        bottom = [(text[r].id, float(s)) for r, s in zip(bi[0], bs[0])]
    need = {i for i, _ in top + bottom}
    texts = {p.id: p.text for p in iter_corpus(root / "data/corpus.jsonl") if p.id in need}
    if args.json:
        print(json.dumps({"inputs_plaintext": args.prompt, "targets_plaintext": args.target, "method": args.method,
                          "proponent_ids": [i for i, _ in top], "proponent_scores": [s for _, s in top],
                          "proponents": [texts[i] for i, _ in top],
                          "opponent_ids": [i for i, _ in bottom], "opponent_scores": [s for _, s in bottom],
                          "opponents": [texts[i] for i, _ in bottom]}, ensure_ascii=False))
        return
    print(f"{args.method} proponents for {args.prompt!r} -> {args.target!r}:")
    for rank, (i, s) in enumerate(top, 1):
        print(f"{rank:3d}. {s:+.4f}  [{i}] {texts[i]}")
    if bottom:
        print("opponents:")
        for rank, (i, s) in enumerate(bottom, 1):
            print(f"{rank:3d}. {s:+.4f}  [{i}] {texts[i]}")


def _plan(args: argparse.Namespace) -> None:
    """Print the memory plan for the current params.yaml, model and data (exit 2 if no structure fits)."""
    from .config import load_params
    from .data import count_lines
    from .errors import TrackStarError
    from .plan import plan

    root = Path(args.root)
    params = load_params(root / "params.yaml")
    model = root / "model"
    if not model.is_dir() and params.model.source == "checkpoint":
        model = root / params.model.checkpoint
    corpus, queries = root / "data/corpus.jsonl", root / "data/queries.jsonl"
    if not model.is_dir() or not corpus.exists() or not queries.exists():
        raise TrackStarError(f"{root}: the plan needs the model and the data: run `dvc repro train` first")
    from .checkpoint import load_checkpoint
    from .layers import find_layers, layout

    g = params.gradients
    layers = find_layers(load_checkpoint(model)[0], g.include, g.exclude, g.include_lm_head)
    p = plan(layout(layers, params.projection.k_for(len(layers))), count_lines(corpus), count_lines(queries),
             params.hessian, params.encode)
    print(p.text())
    p.require(str(root / "params.yaml"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="trackstar", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trace", help="top proponents and opponents for a prompt and target")
    t.add_argument("prompt")
    t.add_argument("--target", required=True, help="the continuation whose loss is traced (include its leading space)")
    t.add_argument("-k", type=int, default=10)
    t.add_argument("--method", choices=["trackstar", "bm25"], default="trackstar")
    t.add_argument("--json", action="store_true", help="one JSON object in the TDA-viewer field names")
    t.add_argument("--root", default=".", help="the pipeline repository (default: current directory)")
    pl = sub.add_parser("plan", help="d, the Hessian structure and the memory each stage needs")
    pl.add_argument("--root", default=".", help="the pipeline repository (default: current directory)")
    args = ap.parse_args(argv)
    run_main(lambda: _trace(args) if args.cmd == "trace" else _plan(args))


if __name__ == "__main__":
    main(sys.argv[1:])
