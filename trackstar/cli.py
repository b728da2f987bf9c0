"""`trackstar trace PROMPT --target TEXT`: top proponents/opponents for any prompt, from the
pipeline's artifacts, encoded exactly as encode@query + precondition@query would (`--html` writes
the viewer's panel for it). `trackstar view`: serve or open the report the `report` stage built.
`trackstar plan`: d, the Hessian structure and the memory each stage needs, before any long stage runs."""

from __future__ import annotations

import argparse
import json
import sys
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

from trackstar.errors import ArtifactMismatch
from trackstar.runner import flush_denormals, run_main


def _trace(args: argparse.Namespace) -> None:
    from trackstar.config import load_params
    from trackstar.data.records import corpus_files, iter_corpus

    root = Path(args.root)
    params = load_params(root / "params.yaml")
    if args.method == "bm25":
        from trackstar.retrieval.bm25 import bm25_search
        (ids, scores), = bm25_search(((p.id, p.text) for p in iter_corpus(corpus_files(root / "data"))),
                                     [("q", args.prompt + args.target)], args.k, params.bm25.k1, params.bm25.b)
        top = list(zip(ids, scores))
        bottom: list[tuple[str, float]] = []
    else:
        from trackstar.encode.encoder import Encoder
        from trackstar.hessian.whitening import load_whitening, whiten
        from trackstar.retrieval.index import load_index, search
        from trackstar.retrieval.results import valid_hits
        flush_denormals()  # torch is loaded now: encode exactly as the encode stage does
        from trackstar.store import StoreReader

        from trackstar.encode.moments import MOMENTS_FILE

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
        text = {i: p for i, p in enumerate(iter_corpus(corpus_files(root / "data"))) if i in rows}
        top = [(text[r].id, float(s)) for r, s in zip(ti[0], ts[0])]
        bottom = [(text[r].id, float(s)) for r, s in zip(bi[0], bs[0])]
    need = {i for i, _ in top + bottom}
    texts = {p.id: p.text for p in iter_corpus(corpus_files(root / "data")) if p.id in need}
    if args.html:
        from trackstar.viewer.report import write_single_page
        from trackstar.retrieval.results import make_result
        record = make_result("trace", args.prompt, args.target, [i for i, _ in top], [s for _, s in top], texts,
                             [i for i, _ in bottom], [s for _, s in bottom])
        write_single_page(args.html, record, args.method, args.entity)
        print(f"wrote {args.html}")
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


def _view(args: argparse.Namespace) -> None:
    import functools
    import http.server
    import webbrowser

    from trackstar.errors import TrackStarError

    root = Path(args.root).resolve()
    page = root / "report" / "index.html"
    if not page.exists():
        raise TrackStarError(f"{page} does not exist: build it with `dvc repro report`")
    if args.file:
        print(page.as_uri())
        if not args.no_browser:
            webbrowser.open(page.as_uri())
        return
    # the pipeline root is served, so ?jsonl_path=../retrievals/bm25.jsonl opens result files too
    handler = functools.partial(_QuietHandler, directory=str(root))
    with http.server.ThreadingHTTPServer((args.host, args.port), handler) as httpd:
        url = f"http://{args.host}:{httpd.server_address[1]}/report/index.html"
        print(f"serving {root} at {url} (Ctrl-C stops)", flush=True)
        if not args.no_browser:
            webbrowser.open(url)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static files without a log line per request."""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass


def _plan(args: argparse.Namespace) -> None:
    """Print the memory plan for the current params.yaml, model and data (exit 2 if no structure fits)."""
    from trackstar.config import load_params
    from trackstar.data.records import corpus_files, count_lines
    from trackstar.errors import TrackStarError
    from trackstar.hessian.plan import plan

    root = Path(args.root)
    params = load_params(root / "params.yaml")
    model = root / "model"
    if not model.is_dir() and params.model.source == "checkpoint":
        model = root / params.model.checkpoint
    corpus, queries = root / "data/corpus.jsonl", root / "data/queries.jsonl"
    if not model.is_dir() or not corpus.exists() or not queries.exists():
        raise TrackStarError(f"{root}: the plan needs the model and the data: run `dvc repro train` first")
    from trackstar.model.checkpoint import load_checkpoint
    from trackstar.encode.layers import find_layers, layout

    g = params.gradients
    layers = find_layers(load_checkpoint(model)[0], g.include, g.exclude, g.include_lm_head)
    p = plan(layout(layers, params.projection.k_for(len(layers))),
             sum(count_lines(f) for f in corpus_files(root / "data")), count_lines(queries),
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
    t.add_argument("--html", metavar="PATH", help="also write the viewer's panel for this query as one HTML file")
    t.add_argument("--entity", help="the query's entity, highlighted in the --html panel")
    v = sub.add_parser("view", help="serve report/ (built by the report stage) and open it in a browser")
    v.add_argument("--root", default=".", help="the pipeline repository (default: current directory)")
    v.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--file", action="store_true", help="open report/index.html from the file system instead of serving it")
    v.add_argument("--no-browser", action="store_true", help="only print the address")
    pl = sub.add_parser("plan", help="d, the Hessian structure and the memory each stage needs")
    pl.add_argument("--root", default=".", help="the pipeline repository (default: current directory)")
    args = ap.parse_args(argv)
    run_main(lambda: {"trace": _trace, "view": _view, "plan": _plan}[args.cmd](args))


if __name__ == "__main__":
    main(sys.argv[1:])
